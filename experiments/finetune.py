"""LoRA fine-tuning of a pretrained base at a longer context.

    python -m experiments.finetune --config=experiments/configs/finetune_small.py --workdir=DIR \
        --config.base=PRETRAIN_WORKDIR_OR_HF_DIR
"""

from absl import app, logging

from experiments._cli import define_flags, print_summary
from tokensparse import runs

_CONFIG, _WORKDIR = define_flags("finetune_small.py")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO; -v brings them back
    print_summary(runs.finetune(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main)
