"""SUBLLM building blocks: schedules, scorer, selection, upsampling and bypass.

The published SUBLLM's scorer, selection, upsampling and bypass (see docs/subllm.md#sources). The math is pure
functions over arrays; :class:`Scorer` and :class:`Bypass` only own parameters (tagged :class:`ScorerParam` /
:class:`BypassParam` so the optimiser can treat them apart, e.g. the scorer's ×0.5 learning rate). The
Balancer lives in :mod:`tokensparse.subllm.balancer`.

Selections are integer indices (no gradient); the scorer learns only through the weights ``w``:
``∂out/∂w_j = y_j − x[idx_j]`` in :func:`upsample`, and through the discard penalty in training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from tokensparse import routing
from tokensparse.attention import attention_mask
from tokensparse.routing import Selection
from tokensparse.subllm.balancer import GRAD_SCALE

BALANCER_PROB_POINTS = ((0.0, 1.0), (8000.0, 0.25))
BYPASS_MIN_POINTS = ((0.0, 0.9), (20000.0, 0.2))
BYPASS_MAX = 1.0
BYPASS_LIMIT_PROB = 0.6
KEY_BIAS_EPS = 1e-3


# --- schedules -----------------------------------------------------------------------------------


def piecewise_linear(step, points: Sequence[tuple[float, float]]) -> Float[Array, ""]:
    """Linear interpolation through ``(step, value)`` points, constant outside; ``step`` may be traced."""
    if not points:
        raise ValueError("points must hold at least one (step, value) pair.")
    xs = [float(x) for x, _ in points]
    if any(b < a for a, b in zip(xs, xs[1:], strict=False)):
        raise ValueError(f"points must have non-decreasing steps, got {xs}.")
    return jnp.interp(jnp.asarray(step, jnp.float32), jnp.asarray(xs, jnp.float32),
                      jnp.asarray([float(y) for _, y in points], jnp.float32))


def balancer_prob(step) -> Float[Array, ""]:
    """Probability that a Balancer call is active: 1.0 at step 0 → 0.25 at step 8000, then constant."""
    return piecewise_linear(step, BALANCER_PROB_POINTS)


def balancer_grad_scale(step, start: float = GRAD_SCALE, steps: int = 0) -> Float[Array, ""]:
    """The Balancer's grad_scale: ``start`` at step 0, falling linearly to the spec's 0.04 at
    ``steps``, then constant; ``steps`` <= 0 gives the spec's 0.04 throughout.

    A larger start lets the Balancer's nudge outweigh the loss's coherent push on the scores early in
    training (what it was measured to do: docs/subllm.md, "A larger grad_scale at the start shortens
    the swing").
    """
    if steps <= 0:
        return jnp.asarray(GRAD_SCALE, jnp.float32)
    return piecewise_linear(step, ((0, start), (steps, GRAD_SCALE)))


def bypass_min(step) -> Float[Array, ""]:
    """Lower limit of the bypass scale c: 0.9 at step 0 → 0.2 at step 20000, then constant."""
    return piecewise_linear(step, BYPASS_MIN_POINTS)


def coin(key: Array, prob) -> Bool[Array, ""]:
    """One Bernoulli(prob) draw: the per-call switch for the Balancer and the bypass limit."""
    return jax.random.bernoulli(key, jnp.asarray(prob, jnp.float32))


# --- scorer --------------------------------------------------------------------------------------


def score(x: Float[Array, "b n d"], weight: Float[Array, " d"]) -> Float[Array, "b n"]:
    """s_t = wᵀx_t, no bias, no activation; accumulated in fp32."""
    return jnp.einsum("...d,d->...", x, weight.astype(x.dtype), preferred_element_type=jnp.float32)


# --- selection -----------------------------------------------------------------------------------


def _check_capacity(capacity: int, n: int) -> int:
    if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer):
        raise TypeError(f"capacity={capacity!r} must be a static integer (see routing.capacity).")
    if not 0 < capacity <= n:
        raise ValueError(f"capacity={capacity} must satisfy 0 < capacity <= {n} (the sequence length).")
    return int(capacity)


def train_select(
    scores: Float[Array, "b n"],
    capacity: int,
    *,
    valid: Bool[Array, "b n"] | None = None,
    flip: bool | Bool[Array, ""] | None = None,
    discard_penalty: bool = True,
) -> tuple[Selection, Float[Array, "b k"]]:
    """icefall's training selection: top-``capacity`` by score plus the discard penalty.

    With sorted weights ``w = clamp(s, 0, 1)``, kept rank j gets ``w[j] − D_j`` where ``D_j = w[k+j]``
    (0 past the end), reversed when ``flip`` (one coin per call). The penalty is what pushes the best
    discarded scores below 0. Padding ranks below every valid token, is never paired as a discard, and
    any slot that must hold it has ``valid=False`` and weight 0. Weights are fp32 and differentiable
    in ``scores``; the indices are not. Note the leak: the penalty can use a later token's score.
    """
    b, n = scores.shape
    k = _check_capacity(capacity, n)
    s = scores.astype(jnp.float32)
    valid = jnp.ones((b, n), bool) if valid is None else jnp.asarray(valid, bool)
    lowest = jnp.finfo(jnp.float32).min
    key = jnp.nan_to_num(jax.lax.stop_gradient(s), nan=lowest, neginf=lowest)
    order = jnp.argsort(jnp.where(valid, key, -jnp.inf), axis=-1, descending=True, stable=True)
    valid_sorted = jnp.take_along_axis(valid, order, axis=-1)
    w_sorted = jnp.where(valid_sorted, jnp.clip(jnp.take_along_axis(s, order, axis=-1), 0.0, 1.0), 0.0)

    w = w_sorted[:, :k]
    if discard_penalty:
        if flip is None:
            raise ValueError("train_select with discard_penalty=True needs flip (a per-call coin).")
        discarded = w_sorted[:, k:2 * k]
        if discarded.shape[1] < k:
            discarded = jnp.pad(discarded, ((0, 0), (0, k - discarded.shape[1])))
        flip = jnp.asarray(flip, bool)
        flip = flip[:, None] if flip.ndim == 1 else flip
        w = w - jnp.where(flip, discarded[:, ::-1], discarded)

    kept = order[:, :k]
    perm = jnp.argsort(kept, axis=-1)
    sel = Selection(
        indices=jnp.take_along_axis(kept, perm, axis=-1).astype(jnp.int32),
        valid=jnp.take_along_axis(valid_sorted[:, :k], perm, axis=-1),
    )
    return sel, jnp.take_along_axis(w, perm, axis=-1)


def infer_select(
    scores: Float[Array, "b n"],
    capacity: int,
    *,
    threshold: float = 0.0,
    valid: Bool[Array, "b n"] | None = None,
) -> tuple[Selection, Float[Array, "b k"]]:
    """Inference selection: ``s > threshold``, first-come up to ``capacity``; w = clamp(s, 0, 1).

    Causal (token t's fate depends on tokens ≤ t), so prefill and token-by-token decode agree.
    Padding slots have ``valid=False`` and weight 0.
    """
    sel = routing.threshold_select(scores, capacity, threshold, valid)
    w = jnp.clip(routing.gather(scores.astype(jnp.float32), sel), 0.0, 1.0)
    return sel, jnp.where(sel.valid, w, 0.0)


# --- upsampling and bypass -----------------------------------------------------------------------


def upsample(
    x: Float[Array, "b n d"], y: Float[Array, "b k d"], sel: Selection, w: Float[Array, "b k"]
) -> Float[Array, "b n d"]:
    """out = x, except kept rows become ``w·y + (1 − w)·x`` (the spec's upsampling).

    Written as ``x + scatter_add(w·(y − x[idx]))`` so dropped rows are x bit-for-bit and padding slots
    write nothing even when their index repeats a real one.
    """
    delta = w[..., None].astype(x.dtype) * (y.astype(x.dtype) - routing.gather(x, sel))
    return routing.scatter_add(x, sel, delta)


def key_bias(w: Float[Array, "b k"]) -> Float[Array, "b k"]:
    """log(w + 1e-3) in fp32: the attention bias of a kept key of weight w (icefall's
    upsampling variant; option ``weight_attn_bias``). A key of weight 0 is damped by e^-6.9, not removed."""
    return jnp.log(w.astype(jnp.float32) + KEY_BIAS_EPS)


def key_biased_attention(
    q: Float[Array, "b t h dh"],
    k: Float[Array, "b t hkv dh"],
    v: Float[Array, "b t hkv dh"],
    bias: Float[Array, "b t"],
    *,
    q_positions,
    kv_positions,
    q_segment_ids=None,
    kv_segment_ids=None,
) -> Float[Array, "b t h dh"]:
    """Causal grouped-query attention whose logits get ``bias[b, j]`` added for key j (every query
    head alike), masked by positions and segment ids like :func:`tokensparse.attention.attention`
    (a query row with no visible key returns zeros). XLA only: no kernel takes a key bias."""
    mask = attention_mask(q_positions, kv_positions, q_segment_ids, kv_segment_ids, causal=True)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias[:, None, None, :].astype(q.dtype),
                                       mask=mask[:, None], implementation="xla")
    visible = jnp.any(mask, axis=-1)[:, :, None, None]
    return jnp.where(visible, out, jnp.zeros((), out.dtype))


def bypass(
    x: Float[Array, "b n d"], u: Float[Array, "b n d"], c: Float[Array, " d"]
) -> Float[Array, "b n d"]:
    """z = x + c ⊙ (u − x): a learned per-channel mix of the pre-subsampling and upsampled streams."""
    return x + c.astype(x.dtype) * (u.astype(x.dtype) - x)


@jax.custom_vjp
def _limit_grad(c, c_min, c_max, active):
    del c_min, c_max, active
    return c


def _limit_grad_fwd(c, c_min, c_max, active):
    return c, (c, c_min, c_max, active)


def _limit_grad_bwd(residuals, g):
    c, c_min, c_max, active = residuals
    g = jnp.where(active & (c < c_min) & (g > 0), -g, g)
    g = jnp.where(active & (c > c_max) & (g < 0), -g, g)
    return g, None, None, None


_limit_grad.defvjp(_limit_grad_fwd, _limit_grad_bwd)


def limit_grad(
    c: Float[Array, "..."], c_min, c_max=BYPASS_MAX, active: bool | Bool[Array, ""] = True
) -> Float[Array, "..."]:
    """Identity forward; when ``active``, flip the loss gradient g where (c < c_min ∧ g > 0) or
    (c > c_max ∧ g < 0), so a descent step moves c back towards [c_min, c_max] (icefall's
    ``limit_param_value``). A gradient-side limit, not a clamp: c may sit outside the range."""
    return _limit_grad(c, jnp.asarray(c_min, c.dtype), jnp.asarray(c_max, c.dtype), jnp.asarray(active, bool))


# --- parameter owners ----------------------------------------------------------------------------


class ScorerParam(nnx.Param):
    """The scorer weight; its own type so an optax multi-transform can give it the ×0.5 learning rate."""


class BypassParam(nnx.Param):
    """The per-channel bypass scale c."""


class Scorer(nnx.Module):
    """Bias-free d→1 projection giving one score per token; weight uniform in ±1/√d (the repo's init)."""

    def __init__(self, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(d_model)
        self.weight = ScorerParam(jax.random.uniform(rngs.params(), (d_model,), jnp.float32, -bound, bound)
                                  .astype(param_dtype))
        self.dtype = dtype

    def __call__(self, x: Float[Array, "b n d"]) -> Float[Array, "b n"]:
        return score(x.astype(self.dtype), self.weight[...])


class Bypass(nnx.Module):
    """Owns the per-channel scale c (init 0.5); optionally applies the training-time gradient limit."""

    def __init__(self, d_model: int, *, init: float = 0.5, param_dtype=jnp.float32,
                 rngs: nnx.Rngs | None = None):
        del rngs
        self.scale = BypassParam(jnp.full((d_model,), init, param_dtype))

    def __call__(self, x: Float[Array, "b n d"], u: Float[Array, "b n d"], *,
                 limit_active: bool | Bool[Array, ""] | None = None, step=None) -> Float[Array, "b n d"]:
        """``limit_active`` is the per-call coin (probability :data:`BYPASS_LIMIT_PROB`); the trainer
        passes ``step`` for ``c_min`` (without one, c_min is the schedule's default 0, as icefall's
        ``ScheduledFloat`` gives without a batch count). Leave it None in evaluation: c is used
        as-is."""
        c = self.scale[...]
        if limit_active is not None:
            c_min = 0.0 if step is None else bypass_min(step)
            c = limit_grad(c, c_min, BYPASS_MAX, limit_active)
        return bypass(x, u, c)
