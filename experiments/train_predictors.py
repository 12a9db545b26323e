"""Train LeMo's pattern predictors for a frozen base (oracle block scores as targets).

    python -m experiments.train_predictors --config=experiments/configs/predictors_small.py
        --workdir=DIR --config.base=PRETRAIN_WORKDIR_OR_HF_DIR
    # then fine-tune with them:
    python -m experiments.finetune --config.method=lemo --config.lemo.predictors=DIR/predictors ...
"""

from absl import app, flags

from experiments import _cli
from experiments._cli import define_flags, main_for
from tokensparse import runs

_CONFIG, _WORKDIR = define_flags("predictors_small.py")

flags.adopt_module_key_flags(_cli)  # --help lists --config and --workdir

if __name__ == "__main__":
    app.run(main_for(runs.train_predictors, _CONFIG, _WORKDIR))
