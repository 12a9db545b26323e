"""SUBLLM: a decoder whose middle layers run on a learned subsample of the sequence.

Spec: ``reference/subllm.md``.

- :mod:`~tokensparse.subllm.modules`: schedules, scorer, training / inference selection, upsampling,
  bypass and its gradient-side limit.
- :mod:`~tokensparse.subllm.balancer`: the Balancer, a custom gradient on the scores.
"""

from tokensparse.subllm.balancer import (
    BalancerBands,
    balance,
    balancer_bands,
    balancer_correction,
    balancer_penalty,
    balancer_stats,
)
from tokensparse.subllm.modules import (
    BYPASS_LIMIT_PROB,
    BYPASS_MAX,
    Bypass,
    BypassParam,
    Scorer,
    ScorerParam,
    balancer_prob,
    bypass,
    bypass_min,
    coin,
    infer_select,
    limit_grad,
    piecewise_linear,
    score,
    train_select,
    upsample,
)

__all__ = [
    "BYPASS_LIMIT_PROB",
    "BYPASS_MAX",
    "BalancerBands",
    "Bypass",
    "BypassParam",
    "Scorer",
    "ScorerParam",
    "balance",
    "balancer_bands",
    "balancer_correction",
    "balancer_penalty",
    "balancer_prob",
    "balancer_stats",
    "bypass",
    "bypass_min",
    "coin",
    "infer_select",
    "limit_grad",
    "piecewise_linear",
    "score",
    "train_select",
    "upsample",
]
