"""LoRA fine-tuning of a pretrained base at a longer context, dense LoRA or LeMo.

    python -m experiments.finetune --config=experiments/configs/finetune_small.py --workdir=DIR \\
        --config.base=PRETRAIN_WORKDIR_OR_HF_DIR [--config.method=lemo --config.train.steps=N]

The context is extended with RoPE linear scaling (factor ceil(seq_len / base context)); LoRA is
r=8, alpha=16 on q, k, v, o by default (--config.lora.*, e.g. --config.lora.targets=q,v), LeMo's
options are --config.lemo.* (e.g. --config.lemo.profile="[1.0, 0.4]"); --config_help lists every
field with its value and meaning.
Writes DIR/config.json, DIR/metrics.jsonl, DIR/checkpoints/ (LoRA state) and DIR/summary.json
(dense validation perplexity; LeMo runs also the sparse one). Rerunning with the same DIR resumes
(with other training settings it is refused, unless --config.train.allow_changed_resume=True); one
process per DIR. SIGTERM or Ctrl-C saves a checkpoint and exits 143 / 130 without summary.json
(docs/training.md). Progress with ETA goes to stderr
(--config.progress=False: off). Bad flags and config values fail before anything is compiled.
"""

from absl import flags

from experiments import _checks, _cli
from experiments._cli import define_flags, main_for

_CONFIG, _WORKDIR = define_flags("finetune_small.py")

flags.adopt_module_key_flags(_cli)  # --help lists --config and --workdir

if __name__ == "__main__":
    _checks.run(main_for("finetune", _CONFIG, _WORKDIR))
