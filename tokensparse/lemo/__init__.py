"""LeMo (Jenga): long-context LoRA fine-tuning with per-layer block elimination.

- :mod:`~tokensparse.lemo.scoring`: block informativeness (the oracle / predictor-target score).
- :mod:`~tokensparse.lemo.selection`: which blocks a sparse layer keeps, by the rule
  ``LeMoConfig.selector`` names (:mod:`~tokensparse.lemo.rules`: oracle, predictor, random,
  attention_ratio, attention_mass, recent, ratio_mass, or a registered one).
- :mod:`~tokensparse.lemo.forward`: the LeMo forward and loss (per-layer elimination).
- :mod:`~tokensparse.lemo.mlp`: SwiGLU with exact forward and channel-sparse backward.
- :mod:`~tokensparse.lemo.predictor`: pattern predictors (selection without q·kᵀ), save/load/attach;
  :mod:`~tokensparse.lemo.predictor_training` trains them on oracle targets
  (:mod:`~tokensparse.lemo.targets`).
- :mod:`~tokensparse.lemo.profiles`: per-layer keep-ratio profiles (Algorithm 1, sensitivity).
- :mod:`~tokensparse.lemo.analysis`: contextual-sparsity statistics of a model's attention;
  :mod:`~tokensparse.lemo.estimators`: training-free estimates of the oracle scores.

Entry points, importable from here: :class:`LeMoConfig` (the options), :func:`lemo_loss` (the
training loss: ``train.make_train_step(partial(lemo_loss, lemo=cfg), wrt=lora.LoRAParam)``),
:func:`group_layers` (group the layers to the schedule once, before the optimizer),
:func:`check_lemo` (fail early on a config the model cannot run), :func:`sparse_forward_loss`
(what elimination alone costs a model), and the selector modules ``learned_selector`` /
``predictor`` (``attach`` / ``load``) and ``rules`` (``register`` a selection rule).
"""

from tokensparse.config import LeMoConfig
from tokensparse.lemo import learned_selector, predictor, rules
from tokensparse.lemo.forward import (
    check_lemo,
    group_layers,
    lemo_hidden_states,
    lemo_loss,
    sparse_forward_loss,
)
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
    "LeMoConfig",
    "ScoreOptions",
    "block_scores",
    "block_scores_reference",
    "channel_sparse_swiglu",
    "check_lemo",
    "group_layers",
    "column_scores",
    "keep_channels",
    "learned_selector",
    "lemo_hidden_states",
    "lemo_loss",
    "num_blocks",
    "predictor",
    "rules",
    "select_blocks",
    "sparse_backward_mlp",
    "sparse_forward_loss",
]
