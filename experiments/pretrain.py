"""Pretrain a Llama-family model from scratch on the offline corpus.

    python -m experiments.pretrain --config=experiments/configs/pretrain_tiny.py --workdir=DIR
        [--config.train.steps=N]
"""

from absl import app, flags

from experiments import _cli
from experiments._cli import define_flags, main_for
from tokensparse import runs

_CONFIG, _WORKDIR = define_flags("pretrain_tiny.py")

flags.adopt_module_key_flags(_cli)  # --help lists --config and --workdir

if __name__ == "__main__":
    app.run(main_for(runs.pretrain, _CONFIG, _WORKDIR))
