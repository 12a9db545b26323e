"""Training a SUBLLM (the published training forward; the library's recipe): the step-aware loss,
evaluation modes and the optimiser.

The loss is plain shifted CE: the Balancer and the bypass limit act only through gradients, driven
by the optimiser's step (their schedules) and a per-step key (their per-call coins). The scorer's
learning rate is scaled (×0.5 by default) by scaling its updates after AdamW (``optax.masked``);
the scorer has no weight decay (a vector), so this equals a smaller learning rate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from tokensparse import train
from tokensparse.config import TrainConfig
from tokensparse.subllm.model import hidden_fn

EVAL_MODES = ("infer", "topk")


def train_loss(*, seed: int = 0, loss_segment: int = 0, step_multiplier: float = 1.0,
               layout: Callable | None = None) -> Callable:
    """``loss_fn(model, batch, step)`` for :func:`tokensparse.train.make_train_step` (``pass_step``).

    Schedules see ``step · step_multiplier`` (icefall's duration-adjusted batch count); the
    coins use ``fold_in(key(seed), step)``, so a resumed run draws the same coins. ``layout``: see
    :func:`tokensparse.train.lm_loss` (it needs ``level_positions="composed"``: the "parent" ranks
    are counted in array order).
    """
    if not step_multiplier > 0:
        raise ValueError(f"step_multiplier={step_multiplier} must be positive.")

    def loss_fn(model, batch, step):
        rng = jax.random.fold_in(jax.random.key(seed), step)
        schedule_step = jnp.asarray(step, jnp.float32) * step_multiplier
        if layout is not None and model.subllm_config.level_positions != "composed":
            raise ValueError("a sequence layout needs SubLLMConfig.level_positions='composed'.")
        return train.lm_loss(model, batch, loss_segment=loss_segment, layout=layout,
                             hidden_fn=hidden_fn(mode="train", step=schedule_step, rng=rng))

    return loss_fn


def eval_loss(mode: str = "infer", *, loss_segment: int = 0) -> Callable:
    """``loss_fn(model, batch)`` with threshold (``"infer"``) or deterministic top-k selection."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode {mode!r} must be one of {EVAL_MODES}.")

    def loss_fn(model, batch):
        return train.lm_loss(model, batch, loss_segment=loss_segment, hidden_fn=hidden_fn(mode=mode))

    return loss_fn


def is_scorer(path: tuple) -> bool:
    return any(getattr(k, "key", getattr(k, "name", None)) == "scorers" for k in path)


def _scorer_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: is_scorer(path), params)


def make_optimizer(tc: TrainConfig, *, scorer_lr_scale: float = 0.5, scorer_warmup: bool = True
                   ) -> optax.GradientTransformation:
    """The shared recipe (:func:`tokensparse.train.make_optimizer`) with the scorer's updates scaled.

    ``scorer_warmup=False`` (not the spec's) gives the scorers their own AdamW whose schedule skips
    the warm-up: during it they already run at the peak learning rate (× ``scorer_lr_scale``), then
    follow the same schedule as the rest. The gradient clipping still sees every parameter's gradient
    together (what it was measured to do: docs/subllm.md)."""
    if not scorer_lr_scale > 0:
        raise ValueError(f"scorer_lr_scale={scorer_lr_scale} must be positive.")
    if not scorer_warmup:
        scorer_schedule = train.learning_rate_schedule(
            dataclasses.replace(tc, lr=tc.lr * scorer_lr_scale), warmup=False)
        labels = lambda params: jax.tree.map(lambda s: "scorer" if s else "rest", _scorer_mask(params))
        return train.with_clipping(tc, optax.multi_transform(
            {"scorer": train.adamw(tc, scorer_schedule), "rest": train.adamw(tc)}, labels))
    base = train.make_optimizer(tc)
    if scorer_lr_scale == 1.0:
        return base
    return optax.chain(base, optax.masked(optax.scale(scorer_lr_scale), _scorer_mask))
