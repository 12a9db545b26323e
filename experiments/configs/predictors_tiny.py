"""Tiny LeMo predictor training (tests): base = a pretrain_tiny workdir, 256-token windows."""

from experiments.configs import predictors_small


def get_config():
    c = predictors_small.get_config()
    c.data.vocab_size = 512
    c.train.seq_len = 256
    c.train.block_size = 32
    c.train.steps = 12
    c.train.train_windows = 4
    c.train.eval_windows = 2
    c.train.prune_every = 5
    c.train.prune_until = 11
    c.train.log_every = 4
    c.train.checkpoint_every = 4
    return c
