"""LeMo (Jenga): long-context LoRA fine-tuning with per-layer block elimination.

Spec: ``reference/lemo.md``.

- :mod:`~tokensparse.lemo.scoring`: block informativeness (the oracle / predictor-target score).
- :mod:`~tokensparse.lemo.mlp`: SwiGLU with exact forward and channel-sparse backward.
- :mod:`~tokensparse.lemo.model`: the LeMo forward and loss (per-layer elimination).
- :mod:`~tokensparse.lemo.threshold`: Algorithm 1, per-layer thresholds → keep-ratio profile.
- :mod:`~tokensparse.lemo.predictor`: pattern predictors (selection without q·kᵀ), save/load/attach.
- :mod:`~tokensparse.lemo.predictor_training`: training them on oracle targets, pruning, recall.
"""

from tokensparse.lemo.mlp import channel_sparse_swiglu, keep_channels, sparse_backward_mlp
from tokensparse.lemo.scoring import (
    ScoreOptions,
    block_scores,
    block_scores_reference,
    column_scores,
    num_blocks,
    select_blocks,
)

__all__ = [
    "ScoreOptions",
    "block_scores",
    "block_scores_reference",
    "channel_sparse_swiglu",
    "column_scores",
    "keep_channels",
    "num_blocks",
    "select_blocks",
    "sparse_backward_mlp",
]
