"""SUBLLM's Balancer: an identity on the scores whose backward nudges their statistics into a band.

SUBLLM's scorer Balancer (from icefall's ``Balancer``; see docs/subllm.md#sources). The scorer must make about
``keep`` of the scores positive, because inference keeps ``s > 0``. There is no loss term: the backward adds
``|g| ⊙ g_b`` to the incoming gradient ``g``, where ``g_b`` is the gradient of a band penalty on the scores'
mean/std and rms, rescaled to a fixed rms. A descent step on ``s`` thus moves the statistics towards the band,
by an amount proportional to how hard the loss is already pushing each token.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

# icefall's cheap inverse of p = Φ(μ/σ) for Gaussian scores: μ/σ ≈ 0.8139535·atanh(2p − 1).
PROB_TO_MEAN_STD = 0.8139535
# For a zero-mean Gaussian, rms = √(π/2)·mean|s|; icefall converts its mean-abs band with this factor.
ABS_TO_RMS = 1.25331414
GRAD_SCALE = 0.04


STATISTICS = ("mean_std", "proportion")


class BalancerBands(NamedTuple):
    """Target bands for the score statistics (static Python floats; ±inf means unbounded).

    ``proportion`` is the proportion-positive band that ``mean_std`` approximates for Gaussian scores.
    """

    mean_std: tuple[float, float]
    rms: tuple[float, float]
    proportion: tuple[float, float] = (0.0, 1.0)


def _proportion_to_mean_std(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return PROB_TO_MEAN_STD * math.atanh(2.0 * p - 1.0)


def balancer_bands(
    keep: float, *, margin: float = 0.05, min_abs: float = 1.0, max_abs: float = 4.0
) -> BalancerBands:
    """Bands for a subsampler keeping ``keep`` of its tokens (the official repo's choice).

    The proportion-positive band ``[keep − margin, keep + margin]`` becomes a μ/σ band (for keep 0.64:
    [0.148125, 0.325630]); the mean-abs band ``[min_abs, max_abs]`` becomes an rms band
    ([1.253314, 5.013257]). A proportion at or beyond 0 or 1 leaves that side unbounded.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} must be in (0, 1].")
    if margin < 0.0:
        raise ValueError(f"margin={margin} must be >= 0.")
    if not 0.0 <= min_abs <= max_abs:
        raise ValueError(f"Need 0 <= min_abs <= max_abs, got min_abs={min_abs}, max_abs={max_abs}.")
    return BalancerBands(
        mean_std=(_proportion_to_mean_std(keep - margin), _proportion_to_mean_std(keep + margin)),
        rms=(ABS_TO_RMS * min_abs, ABS_TO_RMS * max_abs),
        proportion=(keep - margin, keep + margin),
    )


def _valid_mask(scores: Array, valid: Array | None) -> Bool[Array, "..."]:
    if valid is None:
        return jnp.ones(scores.shape, bool)
    return jnp.broadcast_to(jnp.asarray(valid, bool), scores.shape)


def _valid_mean(values: Array, valid: Array | None) -> Float[Array, ""]:
    """fp32 mean of ``values`` over the valid entries (0 when there are none)."""
    valid = _valid_mask(values, valid)
    total = jnp.sum(jnp.where(valid, values.astype(jnp.float32), 0.0))
    return total / jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)


def positive_fraction(scores: Float[Array, "b n"], valid: Bool[Array, "b n"] | None = None
                      ) -> Float[Array, ""]:
    """The fraction of valid scores > 0: what the inference threshold keeps (no gradient)."""
    return jax.lax.stop_gradient(_valid_mean(scores > 0, valid))


def balancer_stats(
    scores: Float[Array, "b n"], valid: Bool[Array, "b n"] | None = None
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """(μ, r, σ) in fp32 over the valid tokens of the whole batch.

    r = √mean(s²) and σ = √max(r² − μ², 1e-20); r is floored at 1e-10 so all-zero scores stay finite.
    """
    s = scores.astype(jnp.float32)
    mean, mean_sq = _valid_mean(s, valid), _valid_mean(s * s, valid)
    rms = jnp.sqrt(jnp.maximum(mean_sq, 1e-20))
    std = jnp.sqrt(jnp.maximum(mean_sq - mean * mean, 1e-20))
    return mean, rms, std


def _check_statistic(statistic: str) -> str:
    if statistic not in STATISTICS:
        raise ValueError(f"Balancer statistic={statistic!r} must be one of {STATISTICS}.")
    return statistic


def balancer_penalty(
    scores: Float[Array, "b n"], valid: Bool[Array, "b n"] | None, bands: BalancerBands,
    statistic: str = "mean_std",
) -> Float[Array, ""]:
    """L_bal = |μ/σ − clamp(μ/σ, m_lo, m_hi)| + |log(clamp(r, r_lo, r_hi)/r)|; zero inside the bands.

    Written as a sum of ReLUs (the same function) so its gradient inside a band is exactly zero, not
    rounding noise that the rescaling in :func:`balancer_correction` would blow up to full size.

    ``statistic="proportion"`` (not the spec's; an option): the location term is the distance of the
    *measured* proportion of positive scores p̂ (:func:`positive_fraction`) from ``bands.proportion``
    instead of μ/σ's from its Gaussian equivalent. p̂ has no gradient, so outside the band the term's
    gradient is ∓∂(μ/σ)/∂s, the spec's direction. For skewed scores the two disagree: μ/σ = 0.33 (the
    band's top) can mean p̂ = 0.54.
    """
    _check_statistic(statistic)
    mean, rms, std = balancer_stats(scores, valid)
    ratio = mean / std
    log_rms = jnp.log(rms)
    (m_lo, m_hi), (r_lo, r_hi) = bands.mean_std, bands.rms
    relu = jax.nn.relu
    with np.errstate(divide="ignore"):
        log_lo, log_hi = np.log(r_lo), np.log(r_hi)
    if statistic == "mean_std":
        location = relu(m_lo - ratio) + relu(ratio - m_hi)
    else:
        p_lo, p_hi = bands.proportion
        positive = positive_fraction(scores, valid)
        below, above = relu(p_lo - positive), relu(positive - p_hi)  # at most one is nonzero
        direction = jnp.sign(below) - jnp.sign(above)  # +1: push the scores up
        location = below + above + direction * (jax.lax.stop_gradient(ratio) - ratio)
    return location + relu(log_lo - log_rms) + relu(log_rms - log_hi)


def balancer_correction(
    scores: Float[Array, "b n"],
    valid: Bool[Array, "b n"] | None,
    bands: BalancerBands,
    grad_scale: float = GRAD_SCALE,
    statistic: str = "mean_std",
) -> Float[Array, "b n"]:
    """g_b = ∂L_bal/∂s (fp32), rescaled so its rms over valid tokens is ``grad_scale`` (zero stays zero).

    This is the per-token direction the backward adds, before the ``|g|`` scaling.
    """
    valid = _valid_mask(scores, valid)
    grad = jax.grad(balancer_penalty)(scores.astype(jnp.float32), valid, bands, statistic)
    grad = jnp.where(valid, grad, 0.0)
    count = jnp.maximum(jnp.sum(valid, dtype=jnp.float32), 1.0)
    rms = jnp.sqrt(jnp.sum(grad * grad) / count)
    nonzero = rms > 0.0
    return jnp.where(nonzero, grad * (grad_scale / jnp.where(nonzero, rms, 1.0)), 0.0)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _balance(scores, valid, active, grad_scale, bands, statistic):
    del valid, active, grad_scale, bands, statistic
    return scores


def _balance_fwd(scores, valid, active, grad_scale, bands, statistic):
    del bands, statistic
    return scores, (scores, valid, active, grad_scale)


def _balance_bwd(bands, statistic, residuals, g):
    scores, valid, active, grad_scale = residuals
    g_b = balancer_correction(scores, valid, bands, grad_scale, statistic)
    g32 = g.astype(jnp.float32)
    corrected = (g32 + jnp.abs(g32) * g_b).astype(g.dtype)
    return jnp.where(active & valid, corrected, g), None, None, jnp.zeros_like(grad_scale)


_balance.defvjp(_balance_fwd, _balance_bwd)


def balance(
    scores: Float[Array, "b n"],
    *,
    keep: float,
    active: bool | Bool[Array, ""],
    valid: Bool[Array, "b n"] | None = None,
    grad_scale: float | Float[Array, ""] = GRAD_SCALE,
    margin: float = 0.05,
    min_abs: float = 1.0,
    max_abs: float = 4.0,
    statistic: str = "mean_std",
) -> Float[Array, "b n"]:
    """Identity forward; backward ``g ← g + |g| ⊙ g_b`` at valid tokens when ``active``.

    ``active`` is the per-call coin (drawn by the caller with probability
    :func:`~tokensparse.subllm.modules.balancer_prob` of the step); a traced bool is fine. Statistics are
    taken over the valid tokens of the whole batch; invalid tokens' gradients pass unchanged.
    ``statistic``: ``"mean_std"`` (the spec's) or ``"proportion"`` (see :func:`balancer_penalty`).
    ``grad_scale`` (the rms of g_b; the spec's 0.04) may be traced, e.g. a schedule of the step
    (:func:`~tokensparse.subllm.modules.balancer_grad_scale`).
    """
    bands = balancer_bands(keep, margin=margin, min_abs=min_abs, max_abs=max_abs)
    return _balance(scores, _valid_mask(scores, valid), jnp.asarray(active, bool),
                    jnp.asarray(grad_scale, jnp.float32), bands, _check_statistic(statistic))
