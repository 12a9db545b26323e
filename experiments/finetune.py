"""LoRA fine-tuning of a pretrained base at a longer context.

    python -m experiments.finetune --config=experiments/configs/finetune_small.py --workdir=DIR
        --config.base=PRETRAIN_WORKDIR_OR_HF_DIR
"""

from absl import app, flags

from experiments import _cli
from experiments._cli import define_flags, main_for
from tokensparse import runs

_CONFIG, _WORKDIR = define_flags("finetune_small.py")

flags.adopt_module_key_flags(_cli)  # --help lists --config and --workdir

if __name__ == "__main__":
    app.run(main_for(runs.finetune, _CONFIG, _WORKDIR))
