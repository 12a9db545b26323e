"""Pretrain a Llama-family model (or SUBLLM / its dense twin) from scratch on the offline corpus.

    python -m experiments.pretrain --config=experiments/configs/pretrain_tiny.py --workdir=DIR \\
        [--config.train.steps=N --config.train.remat=full --config.model.overrides.n_layers=4]
    python -m experiments.pretrain --config=experiments/configs/pretrain_subllm_small.py \\
        --workdir=DIR --config.model=subllm        # or dense: SUBLLM's twin, same recipe

Writes DIR/config.json, DIR/metrics.jsonl (one JSON object per logged step), DIR/checkpoints/,
DIR/summary.json, DIR/tokenizer.json and DIR/hf/ (the fine-tuning base, HF format). Rerunning with
the same DIR resumes exactly (with other training settings it is refused, unless
--config.train.allow_changed_resume=True); one process per DIR. SIGTERM or Ctrl-C saves a checkpoint
and exits 143 / 130 without summary.json or hf/ (docs/training.md). Progress (loss, tokens/s,
ETA) goes to stderr; --config.progress=False turns it off. --config_help lists every config field with
its value and meaning. Bad flags and config values fail before anything is compiled.
"""

from absl import flags

from experiments import _checks, _cli
from experiments._cli import define_flags, main_for

_CONFIG, _WORKDIR = define_flags("pretrain_tiny.py")

flags.adopt_module_key_flags(_cli)  # --help lists --config and --workdir

if __name__ == "__main__":
    _checks.run(main_for("pretrain", _CONFIG, _WORKDIR))
