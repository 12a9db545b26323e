"""Generate text with a model: an exported or any Hugging Face directory, a run's workdir, or a zoo name.

    python -m experiments.generate --model=DIR --prompt="ROMEO:" [--max_new_tokens=40]
        [--temperature=0.8 --top_p=0.95 --seed=0]

``--model`` is a Hugging Face Llama directory (e.g. ``experiments.export``'s merged output: its
``tokenizer.json`` comes with it), a pretraining or fine-tuning workdir (a fine-tune's LoRA adapters
on its base: :func:`tokensparse.runs.load_run`), or a :mod:`tokensparse.zoo` name (``smollm2-135m``).
Greedy by default; ``--temperature`` > 0 samples (nucleus ``--top_p``). Decoding uses the KV cache
(:func:`tokensparse.generate.generate`) and stops at the tokenizer's end-of-text token.
"""

from __future__ import annotations

import pathlib

from absl import flags

from experiments import _checks

_MODEL = flags.DEFINE_string("model", None, "A Hugging Face directory, a run's workdir, or a zoo "
                             "model name.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:", "The text to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 40, "Tokens to generate.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample at this temperature.",
                                  lower_bound=0.0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")

flags.register_validator(_TOP_P, lambda p: 0.0 < p <= 1.0, message="--top_p must be in (0, 1].")


def load(name: str):
    """``(model, config, tokenizer)`` of ``name``: a run's workdir (it has ``checkpoints/``) through
    :func:`tokensparse.runs.load_run`, anything else through :func:`tokensparse.runs.load_base`."""
    from tokensparse import runs

    path = pathlib.Path(name)
    if (path / "checkpoints").is_dir():
        return runs.load_run(path)
    return runs.load_base(name)


def main(argv):
    del argv
    import jax

    from tokensparse import generate

    model, _, tokenizer = load(_MODEL.value)
    ids = tokenizer.encode(_PROMPT.value).ids
    if not ids:
        _checks.fail(f"--prompt={_PROMPT.value!r} encodes to no tokens.")
    rng = jax.random.key(_SEED.value) if _TEMPERATURE.value > 0 else None
    out = generate.generate(model, [ids], max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                            top_p=_TOP_P.value, rng=rng, eos_id=getattr(tokenizer, "eos_token_id", None))
    new = [int(t) for t in out.new_tokens[0][:int(out.lengths[0]) - len(ids)]]
    print(_PROMPT.value + tokenizer.decode(new))


if __name__ == "__main__":
    _checks.run(main)
