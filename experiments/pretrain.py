"""Pretrain a Llama-family model from scratch on the offline corpus.

    python -m experiments.pretrain --config=experiments/configs/pretrain_tiny.py --workdir=DIR \
        [--config.train.steps=N]
"""

from absl import app, logging

from experiments._cli import define_flags, print_summary
from tokensparse import runs

_CONFIG, _WORKDIR = define_flags("pretrain_tiny.py")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v brings them back
    print_summary(runs.pretrain(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
