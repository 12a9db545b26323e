"""SUBLLM: a decoder whose middle layers run on a learned subsample of the sequence.

The SUBLLM specification, summarised in docs/subllm.md.

- :mod:`~tokensparse.subllm.modules`: schedules, scorer, training / inference selection, upsampling,
  bypass and its gradient-side limit.
- :mod:`~tokensparse.subllm.balancer`: the Balancer, a custom gradient on the scores.
- :mod:`~tokensparse.subllm.structure`: structure strings, :class:`SubLLMConfig` and presets.
- :mod:`~tokensparse.subllm.model`: the :class:`SubLLM` model.
"""

from tokensparse.subllm.balancer import (
    BalancerBands,
    balance,
    balancer_bands,
    balancer_correction,
    balancer_penalty,
    balancer_stats,
    positive_fraction,
)
from tokensparse.subllm.model import SubLLM, hidden_fn, spec_init
from tokensparse.subllm.modules import (
    BYPASS_LIMIT_PROB,
    BYPASS_MAX,
    Bypass,
    BypassParam,
    Scorer,
    ScorerParam,
    balancer_grad_scale,
    balancer_prob,
    bypass,
    bypass_min,
    coin,
    infer_select,
    key_bias,
    key_biased_attention,
    limit_grad,
    piecewise_linear,
    score,
    train_select,
    upsample,
)
from tokensparse.subllm.structure import (
    Op,
    Structure,
    SubLLMConfig,
    dense_twin,
    parse_structure,
    subllm_preset,
    subllm_preset_names,
)

__all__ = [
    "BYPASS_LIMIT_PROB",
    "BYPASS_MAX",
    "BalancerBands",
    "Bypass",
    "BypassParam",
    "Scorer",
    "ScorerParam",
    "Op",
    "Structure",
    "SubLLM",
    "SubLLMConfig",
    "balance",
    "balancer_bands",
    "balancer_correction",
    "balancer_grad_scale",
    "balancer_penalty",
    "balancer_prob",
    "balancer_stats",
    "positive_fraction",
    "bypass",
    "bypass_min",
    "coin",
    "dense_twin",
    "hidden_fn",
    "infer_select",
    "key_bias",
    "key_biased_attention",
    "limit_grad",
    "parse_structure",
    "piecewise_linear",
    "score",
    "spec_init",
    "subllm_preset",
    "subllm_preset_names",
    "train_select",
    "upsample",
]
