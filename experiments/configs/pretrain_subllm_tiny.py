"""Pretrain `subllm-tiny` (6 layers, T(T(TT)T)T) or its dense twin briefly: tests and smoke runs."""

from experiments.run_configs import pretrain_dict, subllm_dict
from tokensparse.config import DataConfig, TrainConfig


def get_config():
    return pretrain_dict(
        model="subllm",  # or "dense"
        subllm=subllm_dict("subllm-tiny", overrides={"max_positions": 128}),
        data=DataConfig(source="shakespeare", vocab_size=512),
        train=TrainConfig(steps=20, batch_size=4, seq_len=128, lr=3e-3, warmup_steps=4, log_every=5,
                          checkpoint_every=10, eval_every=10, eval_batches=2))
