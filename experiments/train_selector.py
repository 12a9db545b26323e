"""Train LeMo's learned selector (``LeMoConfig.selector="learned"``) for a frozen base.

    python -m experiments.train_selector --base=smollm2-135m --out=selector.npz \\
        [--windows=12 --seq_len=1024 --steps=400 --layers=all --sparse_keeps=0.7,0.4,0.55,0.85]

Per layer, a per-token MLP on the layer's normed input learns to predict the log of the layer's
exact query-side importance (``attention_ratio``: ‖attention output‖ / ‖residual input‖ from the
frozen model; :mod:`tokensparse.lemo.learned_selector`), on the layer inputs of the LeMo sparse
forward with that exact rule selecting (``--sparse_keeps``). Training windows come from the
training split of the library's Shakespeare corpus, tokenised with the base's tokenizer; quality
(recall of the exact rule's kept blocks and Spearman, per keep ratio) is measured on windows of the
validation split and stored in the file's ``info`` beside the data and settings. Attach the result
with ``learned_selector.attach(model, learned_selector.load(path, config))``; SmolLM2-135M's ships
with the library (``tokensparse/lemo/weights/``) and ``zoo.load`` attaches it.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from experiments import _checks
from tokensparse import data
from tokensparse.config import LeMoConfig
from tokensparse.lemo import learned_selector as ls

_BASE = flags.DEFINE_string("base", "smollm2-135m", "A zoo model name, a pretraining workdir or a "
                            "Hugging Face directory (tokensparse.pipelines.base.load_base).")
_OUT = flags.DEFINE_string("out", None, "Where to write the selector (.npz).", required=True)
_WINDOWS = flags.DEFINE_integer("windows", 12, "Training windows (Shakespeare train split).")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 4, "Validation windows for recall/Spearman.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Tokens per window (a multiple of --block_size).")
_BLOCK = flags.DEFINE_integer("block_size", 64, "LeMo block size the quality metrics use.")
_STEPS = flags.DEFINE_integer("steps", 400, "Adam steps.")
_BATCH = flags.DEFINE_integer("batch", 1024, "Tokens per step (per layer).")
_LR = flags.DEFINE_float("lr", 3e-3, "Peak learning rate (cosine decay).")
_LAYERS = flags.DEFINE_string("layers", "all", "Layers to train: all, or a comma list of indices.")
_TARGET = flags.DEFINE_enum("target", "attention_ratio", sorted(ls.TARGETS), "Per-token target.")
_SEED = flags.DEFINE_integer("seed", 0, "Window sampling and initialisation seed.")
_SPARSE_KEEPS = flags.DEFINE_list(
    "sparse_keeps", ["0.7", "0.4", "0.55", "0.85"], "Training windows run through the LeMo sparse "
    "forward (half schedule, block 0 kept) with the exact attention_ratio rule selecting, at these "
    "keep ratios in turn, so the selector learns on the inputs it meets there; empty: the dense "
    "forward (measured far worse in the loop).")

_checks.at_least(_WINDOWS, 1)
_checks.at_least(_EVAL_WINDOWS, 1)
_checks.at_least(_STEPS, 1)
_checks.at_least(_BATCH, 1)


def split_windows(tokenizer, split: str, seq_len: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` windows of ``seq_len`` tokens at random offsets of the ``split`` works that are long
    enough, cycling through them in name order."""
    corpus = data.load_corpus("shakespeare")
    docs = sorted(getattr(corpus, split), key=lambda d: d.name)
    encoded = [np.asarray(tokenizer.encode(d.text).ids, np.int32) for d in docs]
    encoded = [e for e in encoded if len(e) >= seq_len]
    if not encoded:
        raise app.UsageError(f"no {split} work has {seq_len} tokens.")
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        doc = encoded[i % len(encoded)]
        start = int(rng.integers(0, len(doc) - seq_len + 1))
        out.append(doc[start:start + seq_len])
    return out


def parse_layers(spec: str, n_layers: int) -> tuple[int, ...]:
    if spec == "all":
        return tuple(range(n_layers))
    try:
        layers = tuple(sorted({int(x) for x in spec.split(",")}))
    except ValueError:
        raise app.UsageError(f"--layers={spec!r} must be 'all' or a comma list of ints.") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise app.UsageError(f"--layers={spec!r}: the model has layers 0..{n_layers - 1}.")
    return layers


def main(argv):
    del argv
    from tokensparse.pipelines.base import load_base

    if _SEQ_LEN.value % _BLOCK.value:
        raise app.UsageError(f"--seq_len={_SEQ_LEN.value} must be a multiple of --block_size.")
    t0 = time.perf_counter()
    model, config, tokenizer = load_base(_BASE.value)
    if tokenizer is None:
        raise app.UsageError(f"--base={_BASE.value} comes without a tokenizer; use a zoo model or a "
                             "pretraining workdir.")
    layers = parse_layers(_LAYERS.value, config.n_layers)
    train = split_windows(tokenizer, "train", _SEQ_LEN.value, _WINDOWS.value, _SEED.value)
    valid = split_windows(tokenizer, "validation", _SEQ_LEN.value, _EVAL_WINDOWS.value, _SEED.value)
    sparse = [LeMoConfig(keep_ratio=float(k), selector="attention_ratio", mlp_mode="dense",
                         keep_first_block=True, block_size=_BLOCK.value) for k in _SPARSE_KEEPS.value]
    train_data = ls.collect(model, train, layers, _TARGET.value, sparse=sparse)
    valid_data = ls.collect(model, valid, layers, _TARGET.value)
    print(f"collected {train_data['u'].shape[1]} tokens x {len(layers)} layers "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    params, losses = ls.fit(train_data, steps=_STEPS.value, batch=_BATCH.value, lr=_LR.value,
                            seed=_SEED.value, log_every=max(_STEPS.value // 10, 1))
    nb = _SEQ_LEN.value // _BLOCK.value
    exact = valid_data["target"].reshape(len(layers), -1, _BLOCK.value).mean(-1)
    quality = ls.ranking_metrics(ls.predicted_blocks(params, valid_data, _BLOCK.value), exact,
                                 blocks_per_window=nb)
    info = {"base": _BASE.value, "corpus": "shakespeare train split", "windows": _WINDOWS.value,
            "seq_len": _SEQ_LEN.value, "steps": _STEPS.value, "batch": _BATCH.value,
            "lr": _LR.value, "seed": _SEED.value, "final_loss": losses[-1],
            "sparse_keeps": [float(k) for k in _SPARSE_KEEPS.value],
            "validation": {"windows": _EVAL_WINDOWS.value, "block_size": _BLOCK.value, **quality}}
    selector = ls.LearnedSelector(config.n_layers, config.d_model, layers=layers,
                                  target=_TARGET.value, info=info)
    selector.set_params(ls.stacked(params, layers, config.n_layers))
    ls.save(selector, _OUT.value)
    print(f"wrote {_OUT.value}: validation {quality} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    app.run(main)
