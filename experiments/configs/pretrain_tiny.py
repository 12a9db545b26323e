"""Pretrain the `tiny` preset briefly (tests, smoke runs): seconds on CPU."""

from experiments.run_configs import model_dict, pretrain_dict
from tokensparse.config import DataConfig, TrainConfig


def get_config():
    return pretrain_dict(
        model=model_dict("tiny", max_positions=128),
        data=DataConfig(source="shakespeare", vocab_size=512),
        train=TrainConfig(steps=40, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=5, log_every=5,
                          checkpoint_every=10, eval_every=20, eval_batches=2))
