"""Pretrain `subllm-small` (12 layers, TTT(TT(TT)TT)TTT) or its dense twin on the offline corpus.

    python -m experiments.pretrain --config=experiments/configs/pretrain_subllm_small.py \
        --config.model=subllm --workdir=workdirs/subllm_small
    python -m experiments.pretrain --config=experiments/configs/pretrain_subllm_small.py \
        --config.model=dense --workdir=workdirs/subllm_small_dense

Both get the same data, seed and recipe (the library's recipe, lr scaled for the small preset).
"""

from experiments.run_configs import pretrain_dict, subllm_dict
from tokensparse.config import DataConfig, TrainConfig


def get_config():
    return pretrain_dict(
        model="subllm",  # or "dense": the dense twin
        subllm=subllm_dict("subllm-small", overrides={"max_positions": 2048}),
        data=DataConfig(source="shakespeare", vocab_size=8192),
        train=TrainConfig(steps=400, batch_size=8, seq_len=512, lr=2e-3, warmup_steps=40,
                          log_every=10, checkpoint_every=100, eval_every=100, eval_batches=8))
