"""Pretrain the `small` preset (~9M parameters) on the Shakespeare + Milton corpus: minutes on CPU."""

from experiments.run_configs import model_dict, pretrain_dict
from tokensparse.config import DataConfig, TrainConfig


def get_config():
    # The context it is pretrained at is its "original context"; fine-tuning extends it.
    # --config.mesh.data=-1: every device, the batch split over them.
    return pretrain_dict(
        model=model_dict("small", max_positions=256),
        data=DataConfig(source="shakespeare", vocab_size=8192),
        train=TrainConfig(steps=200, batch_size=8, seq_len=256, lr=2e-3, warmup_steps=20,
                          log_every=10, checkpoint_every=50, eval_every=50, eval_batches=8))
