"""Export a finished (or interrupted) run: a merged Hugging Face Llama, or a PEFT LoRA adapter.

    python -m experiments.export --workdir=RUN --out=DIR [--format=merged|peft] [--step=N]

``merged`` (any pretraining or fine-tuning run): the LoRA adapters folded into the base weights,
written as a Hugging Face Llama directory (config.json with the run's RoPE scaling,
generation_config.json, safetensors sharded past --max_shard_gb with model.safetensors.index.json,
tokenizer files); load it with ``tokensparse.hf.load_llama(DIR)`` or transformers'
``AutoModelForCausalLM.from_pretrained(DIR)``. ``peft`` (fine-tuning runs): adapter_config.json +
adapter_model.safetensors as the peft library writes them; load with
``PeftModel.from_pretrained(base, DIR)``. The newest readable checkpoint is used unless --step is
given. docs/export.md has the details.
"""

from __future__ import annotations

from absl import flags

from experiments import _checks

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's directory (a pretrain or finetune "
                               "--workdir).", required=True)
_OUT = flags.DEFINE_string("out", None, "The directory to write.", required=True)
_FORMAT = flags.DEFINE_enum("format", "merged", ["merged", "peft"], "merged: a Hugging Face Llama "
                            "with the adapters folded in; peft: the LoRA adapter alone.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the newest that "
                             "reads).", lower_bound=0)
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "merged: split the safetensors into files "
                                   "of at most this many GB (10^9 bytes).", lower_bound=1e-9)


def main(argv):
    del argv
    from absl import logging

    from tokensparse import export  # here, not at module level: --help stays fast

    logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint it opens at INFO

    out = export.export_run(_WORKDIR.value, _OUT.value, format=_FORMAT.value, step=_STEP.value,
                            max_shard_bytes=int(_MAX_SHARD_GB.value * 1e9))
    print(f"wrote {_FORMAT.value} export of {_WORKDIR.value} to {out}")


if __name__ == "__main__":
    _checks.run(main)
