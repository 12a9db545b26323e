"""Pretrain `subllm-small` (12 layers, TTT(TT(TT)TT)TTT) or its dense twin on the offline corpus.

    python -m experiments.pretrain --config=experiments/configs/pretrain_subllm_small.py \
        --config.model=subllm --workdir=workdirs/subllm_small
    python -m experiments.pretrain --config=experiments/configs/pretrain_subllm_small.py \
        --config.model=dense --workdir=workdirs/subllm_small_dense

Both get the same data, seed and recipe (spec §4.10, lr scaled for the small preset).
"""

from ml_collections import config_dict

from tokensparse.runs import mesh_config_dict, subllm_config_dict, train_config_dict


def get_config() -> config_dict.ConfigDict:
    c = config_dict.ConfigDict()
    c.model = "subllm"  # or "dense": the dense twin
    c.subllm = subllm_config_dict("subllm-small", overrides={"max_positions": 2048})
    c.data = config_dict.ConfigDict({"source": "shakespeare", "vocab_size": 8192})
    c.train = train_config_dict(steps=400, batch_size=8, seq_len=512, lr=2e-3, warmup_steps=40,
                                log_every=10, checkpoint_every=100, eval_batches=8)
    c.attention_backend = "auto"
    c.mesh = mesh_config_dict()  # e.g. --config.mesh.data=-1: every device, batch split over them
    c.progress = True
    return c
