"""Tiny LoRA fine-tuning (tests): base = a pretrain_tiny workdir, context 2x (256)."""

from experiments.configs import finetune_small


def get_config():
    c = finetune_small.get_config()
    c.data.vocab_size = 512
    c.train.steps = 10
    c.train.seq_len = 256
    c.train.batch_size = 2
    c.train.log_every = 5
    c.train.checkpoint_every = 5
    c.train.eval_every = 5
    c.train.eval_batches = 2
    c.train.loss_segment = 64
    # A tiny base pretrained here has no learned-selector weights (experiments.train_selector makes
    # them): select the spec's way.
    c.lemo.selector = "oracle"
    return c
