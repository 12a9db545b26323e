"""Train LeMo's pattern predictors for a frozen base (oracle block scores as targets).

    python -m experiments.train_predictors --config=experiments/configs/predictors_small.py \\
        --workdir=DIR --config.base=PRETRAIN_WORKDIR_OR_HF_DIR [--config.train.steps=N]
    # then fine-tune with them:
    python -m experiments.finetune --config.method=lemo --config.lemo.predictors=DIR/predictors ...

Writes DIR/predictors/ (the trained, pruned predictors), DIR/metrics.jsonl, DIR/checkpoints/ and
DIR/summary.json (held-out recall@0.4 and Spearman per layer). Rerunning with the same DIR resumes;
SIGTERM or Ctrl-C saves a checkpoint and exits 143 / 130 (no summary.json). Progress with ETA goes to stderr
(--config.progress=False: off). --config_help lists every config field with its value and meaning.
Bad flags and config values fail before anything is compiled.
"""

from absl import flags

from experiments import _checks, _cli
from experiments._cli import define_flags, main_for

_CONFIG, _WORKDIR = define_flags("predictors_small.py")

flags.adopt_module_key_flags(_cli)  # --help lists --config and --workdir

if __name__ == "__main__":
    _checks.run(main_for("train_predictors", _CONFIG, _WORKDIR))
