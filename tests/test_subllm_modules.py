"""SUBLLM building blocks against the spec (scorer, Balancer, selection, upsampling, bypass) and NumPy
references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

from tokensparse import routing
from tokensparse.routing import Selection
from tokensparse.subllm import (
    BYPASS_MAX,
    Bypass,
    BypassParam,
    Scorer,
    ScorerParam,
    balance,
    balancer_bands,
    balancer_correction,
    balancer_grad_scale,
    balancer_penalty,
    balancer_prob,
    balancer_stats,
    bypass,
    bypass_min,
    coin,
    infer_select,
    key_bias,
    key_biased_attention,
    limit_grad,
    piecewise_linear,
    positive_fraction,
    train_select,
    upsample,
)

KEEP = 0.64
BANDS = balancer_bands(KEEP)


# --- schedules -----------------------------------------------------------------------------------


def test_schedule_values():
    for step, p in [(0, 1.0), (4000, 0.625), (8000, 0.25), (12345, 0.25), (10**6, 0.25)]:
        assert float(balancer_prob(step)) == pytest.approx(p, abs=1e-6)
    for step, c in [(0, 0.9), (10000, 0.55), (20000, 0.2), (50000, 0.2)]:
        assert float(bypass_min(step)) == pytest.approx(c, abs=1e-6)
    assert BYPASS_MAX == 1.0


def test_schedules_trace_and_match_numpy():
    points = ((0, 2.0), (10, -1.0), (30, 5.0))
    steps = np.array([-5, 0, 3, 10, 17, 30, 99])
    traced = jax.jit(jax.vmap(lambda s: piecewise_linear(s, points)))(jnp.asarray(steps))
    np.testing.assert_allclose(traced, np.interp(steps, *zip(*points, strict=True)), rtol=1e-6)
    assert float(jax.jit(balancer_prob)(jnp.int32(4000))) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="non-decreasing"):
        piecewise_linear(0, ((5, 1.0), (0, 2.0)))


def test_coin_frequency():
    draws = jax.vmap(lambda k: coin(k, balancer_prob(4000)))(jax.random.split(jax.random.key(0), 4000))
    assert abs(float(draws.mean()) - 0.625) < 0.03


# --- Balancer ------------------------------------------------------------------------------------


def test_band_values():
    (m_lo, m_hi), (r_lo, r_hi), (p_lo, p_hi) = BANDS
    assert (p_lo, p_hi) == pytest.approx((0.59, 0.69))
    assert m_lo == pytest.approx(0.148125, abs=1e-6)
    assert m_hi == pytest.approx(0.325630, abs=1e-6)
    assert r_lo == pytest.approx(1.253314, abs=1e-6)
    assert r_hi == pytest.approx(5.013257, abs=1e-6)
    # keep + margin ≥ 1 leaves the upper μ/σ side open instead of producing NaN.
    assert balancer_bands(1.0).mean_std[1] == math.inf


def _scores_with(ratio: float, rms: float, shape=(3, 40), seed=0) -> np.ndarray:
    """Scores whose μ/σ and rms over all entries are exactly ``ratio`` and ``rms`` (up to fp32)."""
    z = np.random.default_rng(seed).standard_normal(shape)
    z = (z - z.mean()) / z.std()
    sigma = rms / math.sqrt(1.0 + ratio**2)
    return (sigma * z + ratio * sigma).astype(np.float32)


def _np_stats(s: np.ndarray) -> tuple[float, float]:
    s = s.astype(np.float64)
    mu, r = s.mean(), math.sqrt((s**2).mean())
    return mu / math.sqrt(r * r - mu * mu), r


def _np_penalty(s: np.ndarray) -> float:
    ratio, r = _np_stats(s)
    (m_lo, m_hi), (r_lo, r_hi) = BANDS.mean_std, BANDS.rms
    return abs(ratio - np.clip(ratio, m_lo, m_hi)) + abs(math.log(np.clip(r, r_lo, r_hi) / r))


def _np_correction(s: np.ndarray, scale: float = 0.04) -> np.ndarray:
    """Analytic ∂L_bal/∂s rescaled to rms ``scale`` (float64)."""
    s = s.astype(np.float64)
    n, mu, r = s.size, s.mean(), math.sqrt((s**2).mean())
    sigma = math.sqrt(r * r - mu * mu)
    ratio = mu / sigma
    d_ratio = 1.0 / (n * sigma) - mu * (s - mu) / (n * sigma**3)
    d_log_r = s / (n * r * r)
    (m_lo, m_hi), (r_lo, r_hi) = BANDS.mean_std, BANDS.rms
    g = np.zeros_like(s)
    g += -d_ratio if ratio < m_lo else d_ratio if ratio > m_hi else 0.0
    g += -d_log_r if r < r_lo else d_log_r if r > r_hi else 0.0
    rms = math.sqrt((g**2).mean())
    return g * (scale / rms) if rms > 0 else g


def _balanced_grad(s, g, *, active=True, valid=None):
    _, vjp = jax.vjp(lambda x: balance(x, keep=KEEP, active=active, valid=valid), jnp.asarray(s))
    return np.asarray(vjp(jnp.asarray(g))[0])


def test_balancer_forward_is_identity():
    s = jnp.asarray(_scores_with(-1.0, 9.0))
    np.testing.assert_array_equal(balance(s, keep=KEEP, active=True), s)
    s16 = s.astype(jnp.bfloat16)
    out = balance(s16, keep=KEEP, active=True)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(out, s16)


@pytest.mark.parametrize("ratio,rms", [(-0.5, 2.5), (1.0, 2.5), (0.25, 0.5), (0.25, 8.0), (-1.0, 9.0)])
def test_balancer_inactive_leaves_gradient_unchanged(ratio, rms):
    s = _scores_with(ratio, rms)
    g = np.random.default_rng(1).standard_normal(s.shape).astype(np.float32)
    np.testing.assert_array_equal(_balanced_grad(s, g, active=False), g)
    np.testing.assert_array_equal(_balanced_grad(s, g, active=jnp.array(False)), g)


@pytest.mark.parametrize("ratio,rms", [(0.25, 2.5), (0.16, 1.3), (0.3, 4.9)])
def test_balancer_inside_bands_leaves_gradient_unchanged(ratio, rms):
    s = _scores_with(ratio, rms)
    assert _np_penalty(s) == 0.0
    g = np.random.default_rng(1).standard_normal(s.shape).astype(np.float32)
    np.testing.assert_array_equal(_balanced_grad(s, g), g)
    assert not np.any(np.asarray(balancer_correction(jnp.asarray(s), None, BANDS)))


@pytest.mark.parametrize(
    "ratio,rms,which",
    [(-0.5, 2.5, "ratio"), (1.0, 2.5, "ratio"), (0.25, 0.5, "rms"), (0.25, 8.0, "rms"), (-1.0, 9.0, "both")],
)
def test_balancer_correction_moves_stats_toward_band(ratio, rms, which):
    s = _scores_with(ratio, rms)
    g = np.random.default_rng(2).standard_normal(s.shape).astype(np.float32)
    out = _balanced_grad(s, g)
    correction = (out - g) / np.abs(g)  # = g_b, the direction the backward adds per unit |g|
    np.testing.assert_allclose(correction, _np_correction(s), rtol=2e-3, atol=2e-6)
    assert math.sqrt((correction**2).mean()) == pytest.approx(0.04, rel=1e-3)

    stepped = s - 2.0 * correction  # a gradient-descent step along the correction
    assert _np_penalty(stepped) < _np_penalty(s)
    (m_lo, m_hi), (r_lo, r_hi) = BANDS.mean_std, BANDS.rms
    (ratio0, r0), (ratio1, r1) = _np_stats(s), _np_stats(stepped)
    dist = lambda v, lo, hi: max(lo - v, v - hi, 0.0)
    if which in ("ratio", "both"):
        assert dist(ratio1, m_lo, m_hi) < dist(ratio0, m_lo, m_hi)
    if which in ("rms", "both"):
        assert dist(r1, r_lo, r_hi) < dist(r0, r_lo, r_hi)


def test_balancer_correction_rms_is_grad_scale():
    s = jnp.asarray(_scores_with(-0.7, 0.3, seed=5))
    for scale in (0.04, 0.5):
        g_b = np.asarray(balancer_correction(s, None, BANDS, scale))
        assert math.sqrt((g_b.astype(np.float64) ** 2).mean()) == pytest.approx(scale, rel=1e-4)
    assert float(balancer_penalty(s, None, BANDS)) == pytest.approx(_np_penalty(np.asarray(s)), rel=1e-4)


def test_balancer_uses_valid_tokens_of_whole_batch_only():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((2, 16)).astype(np.float32) - 0.8
    valid = np.ones((2, 16), bool)
    valid[0, 11:] = False
    valid[1, 5:] = False
    padded = np.where(valid, s, np.float32(np.nan))  # garbage in the padding must not matter
    padded[1, 7] = 1e6
    g = rng.standard_normal(s.shape).astype(np.float32)

    mean, rms, _ = balancer_stats(jnp.asarray(padded), jnp.asarray(valid))
    assert float(mean) == pytest.approx(s[valid].mean(), rel=1e-5)
    assert float(rms) == pytest.approx(math.sqrt((s[valid].astype(np.float64) ** 2).mean()), rel=1e-5)

    out = _balanced_grad(padded, g, valid=jnp.asarray(valid))
    np.testing.assert_array_equal(out[~valid], g[~valid])
    correction = (out[valid] - g[valid]) / np.abs(g[valid])
    np.testing.assert_allclose(correction, _np_correction(s[valid]), rtol=2e-3, atol=2e-6)


def test_balancer_grad_scale_start_schedule():
    """The spec's 0.04 throughout by default; with a start, linear from it to 0.04, then constant."""
    for step in (0, 500, 10**6):
        assert float(balancer_grad_scale(step)) == pytest.approx(0.04)
        assert float(balancer_grad_scale(step, 1.0, 0)) == pytest.approx(0.04)  # no start steps: off
    for step, scale in [(0, 1.0), (200, 0.52), (400, 0.04), (401, 0.04), (5000, 0.04)]:
        assert float(jax.jit(balancer_grad_scale, static_argnums=(1, 2))(jnp.int32(step), 1.0, 400)) \
            == pytest.approx(scale, abs=1e-6)


def test_balancer_with_a_traced_grad_scale():
    """A traced grad_scale gives the correction of that size: g ← g + |g| ⊙ g_b, rms(g_b) = scale."""
    s = jnp.asarray(_scores_with(-0.5, 2.5))
    g = jnp.asarray(np.random.default_rng(1).standard_normal(s.shape).astype(np.float32))

    @jax.jit
    def grad(s, scale):
        return jax.vjp(lambda x: balance(x, keep=KEEP, active=True, grad_scale=scale), s)[1](g)[0]

    for scale in (0.04, 0.8):
        expected = g + jnp.abs(g) * balancer_correction(s, None, BANDS, scale)
        np.testing.assert_allclose(grad(s, jnp.float32(scale)), expected, rtol=1e-5, atol=1e-7)
    g_b = (grad(s, jnp.float32(0.8)) - g) / jnp.abs(g)
    assert float(jnp.sqrt(jnp.mean(g_b**2))) == pytest.approx(0.8, rel=1e-3)


def test_balancer_under_jit_with_traced_coin():
    s = jnp.asarray(_scores_with(-0.5, 2.5))
    g = jnp.ones_like(s)

    @jax.jit
    def grad(s, active):
        return jax.vjp(lambda x: balance(x, keep=KEEP, active=active), s)[1](g)[0]

    np.testing.assert_array_equal(grad(s, jnp.array(False)), g)
    np.testing.assert_allclose(grad(s, jnp.array(True)), 1.0 + _np_correction(np.asarray(s)), atol=2e-6)


def _skewed_scores(positive: float, n=4000, seed=0) -> np.ndarray:
    """Right-skewed (exponential, skewness 2) scores with exactly ``positive`` of them > 0, rms 2."""
    e = np.sort(np.random.default_rng(seed).exponential(size=n))
    s = e - (e[int(round((1.0 - positive) * n)) - 1] + e[int(round((1.0 - positive) * n))]) / 2
    return (s * (2.0 / math.sqrt((s**2).mean()))).astype(np.float32)[None]


def test_proportion_statistic_follows_the_measured_fraction_not_the_gaussian_estimate():
    """Skewed scores with 64% positive (inside the proportion band) have μ/σ ≈ 0.64, far above the μ/σ
    band: ``mean_std`` pushes them down, ``proportion`` leaves the gradient alone. With 50% positive
    (μ/σ ≈ 0.3, inside the μ/σ band) it is the other way round, and ``proportion`` pushes up."""
    g = np.random.default_rng(4).standard_normal((1, 4000)).astype(np.float32)

    def grad(s, statistic):
        fn = lambda x: balance(x, keep=KEEP, active=True, statistic=statistic)
        return np.asarray(jax.vjp(fn, jnp.asarray(s))[1](jnp.asarray(g))[0])

    in_band = _skewed_scores(0.64)
    assert _np_stats(in_band)[0] > BANDS.mean_std[1] + 0.2
    np.testing.assert_array_equal(grad(in_band, "proportion"), g)
    assert float(balancer_penalty(jnp.asarray(in_band), None, BANDS, "proportion")) == 0.0
    assert float(positive_fraction(jnp.asarray(in_band))) == pytest.approx(0.64)
    pushed = (grad(in_band, "mean_std") - g) / np.abs(g)
    assert np.mean(in_band[0] - pushed[0] > 0) < 0.64  # a descent step lowers the fraction

    below = _skewed_scores(0.50)
    assert BANDS.mean_std[0] < _np_stats(below)[0] < BANDS.mean_std[1]
    np.testing.assert_array_equal(grad(below, "mean_std"), g)
    # the penalty's value is p̂'s distance from the band (rms 2 is inside its band)
    assert float(balancer_penalty(jnp.asarray(below), None, BANDS, "proportion")) == pytest.approx(0.09)
    correction = (grad(below, "proportion") - g) / np.abs(g)
    assert math.sqrt((correction.astype(np.float64) ** 2).mean()) == pytest.approx(0.04, rel=1e-3)
    # the direction of the spec's μ/σ term when μ/σ is below its band: −∂(μ/σ)/∂s, rescaled
    b = below[0].astype(np.float64)
    mu, sigma = b.mean(), b.std()
    want = -(1.0 / sigma - mu * (b - mu) / sigma**3)
    want *= 0.04 / math.sqrt((want**2).mean())
    np.testing.assert_allclose(correction[0], want, rtol=2e-3, atol=2e-6)
    stepped = below - 3.0 * correction
    assert np.mean(stepped > 0) > 0.52 and _np_stats(stepped)[0] > _np_stats(below)[0]
    # padding is not counted: 1000 extra slots of large positive garbage change nothing
    padded = np.concatenate([below, np.full((1, 1000), 1e6, np.float32)], axis=1)
    valid = np.arange(padded.shape[1])[None] < below.shape[1]
    fn = lambda x: balance(x, keep=KEEP, active=True, valid=jnp.asarray(valid), statistic="proportion")
    g_padded = np.concatenate([g, np.ones((1, 1000), np.float32)], axis=1)
    out = np.asarray(jax.vjp(fn, jnp.asarray(padded))[1](jnp.asarray(g_padded))[0])
    np.testing.assert_allclose(out[:, :4000], grad(below, "proportion"), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out[:, 4000:], 1.0)
    with pytest.raises(ValueError, match="statistic"):
        balance(jnp.asarray(below), keep=KEEP, active=True, statistic="median")


def test_balancer_all_zero_scores_stay_finite():
    s = jnp.zeros((2, 8))
    assert np.all(np.isfinite(_balanced_grad(s, np.ones((2, 8), np.float32))))


# --- training selection --------------------------------------------------------------------------


def _np_train_select(s, k, valid=None, flip=False, penalty=True):
    b, n = s.shape
    valid = np.ones((b, n), bool) if valid is None else valid
    idx, val, w = np.zeros((b, k), int), np.zeros((b, k), bool), np.zeros((b, k))
    for i in range(b):
        # Valid tokens by descending score, then padding in position order; ties go to the lower position.
        order = sorted(range(n), key=lambda t: (not valid[i, t], -s[i, t] if valid[i, t] else 0.0, t))
        w_sorted = np.array([np.clip(s[i, t], 0, 1) if valid[i, t] else 0.0 for t in order])
        d = np.zeros(k)
        d[: max(0, min(k, n - k))] = w_sorted[k : 2 * k]
        if flip:
            d = d[::-1]
        w_kept = w_sorted[:k] - (d if penalty else 0.0)
        kept = np.array(order[:k])
        perm = np.argsort(kept)
        idx[i], val[i], w[i] = kept[perm], valid[i, kept[perm]], w_kept[perm]
    return idx, val, w


@given(
    n=st.sampled_from([5, 8, 13]),
    keep=st.sampled_from([0.3, 0.5, 0.64, 1.0]),
    seed=st.integers(0, 2**31 - 1),
    flip=st.booleans(),
    penalty=st.booleans(),
    with_padding=st.booleans(),
)
def test_train_select_matches_numpy(n, keep, seed, flip, penalty, with_padding):
    rng = np.random.default_rng(seed)
    s = rng.choice(np.linspace(-1.5, 1.5, 9), size=(3, n)).astype(np.float32)  # coarse grid: ties
    valid = rng.random((3, n)) < 0.6 if with_padding else None
    k = routing.capacity(n, keep)
    sel, w = train_select(jnp.asarray(s), k, valid=None if valid is None else jnp.asarray(valid),
                          flip=jnp.array(flip), discard_penalty=penalty)
    idx, val, w_ref = _np_train_select(s, k, valid, flip, penalty)
    np.testing.assert_array_equal(sel.indices, idx)
    np.testing.assert_array_equal(sel.valid, val)
    np.testing.assert_allclose(w, w_ref, atol=1e-6)
    assert np.all(np.diff(np.asarray(sel.indices), axis=-1) > 0)  # ascending, distinct: exactly k kept
    assert np.all(np.asarray(w) >= 0.0)
    assert not np.any(np.asarray(w)[~np.asarray(sel.valid)])


def test_train_select_padding_never_beats_valid_tokens():
    s = jnp.array([[5.0, -3.0, 9.0, 0.2, -1.0, 8.0]])
    valid = jnp.array([[False, True, False, True, True, False]])
    sel, w = train_select(s, 4, valid=valid, flip=jnp.array(True))
    np.testing.assert_array_equal(sel.valid.sum(), 3)
    assert set(np.asarray(sel.indices)[np.asarray(sel.valid)]) == {1, 3, 4}
    np.testing.assert_array_equal(np.asarray(w)[~np.asarray(sel.valid)], 0.0)
    # The only discard is padding: it pairs as 0, so the weights are plain clamp(s).
    np.testing.assert_allclose(np.asarray(w)[np.asarray(sel.valid)], [0.0, 0.2, 0.0])


def test_train_select_weights_are_clamp_when_discards_nonpositive():
    rng = np.random.default_rng(4)
    n, k = 12, routing.capacity(12, KEEP)
    s = rng.uniform(-2.0, 2.0, (4, n)).astype(np.float32)
    s = np.sort(s, axis=-1)[:, ::-1].copy()
    s[:, k:] = -np.abs(s[:, k:])  # every discarded score ≤ 0
    s = np.ascontiguousarray(rng.permuted(s, axis=-1))
    for flip in (False, True):
        sel, w = train_select(jnp.asarray(s), k, flip=flip)
        np.testing.assert_array_equal(w, np.clip(np.take_along_axis(s, np.asarray(sel.indices), -1), 0, 1))


def test_train_select_flip_changes_only_the_pairing():
    s = jnp.asarray(np.random.default_rng(5).uniform(-0.3, 1.2, (3, 10)).astype(np.float32))
    k = routing.capacity(10, KEEP)
    (sel0, w0), (sel1, w1) = (train_select(s, k, flip=f) for f in (jnp.array(False), jnp.array(True)))
    np.testing.assert_array_equal(sel0.indices, sel1.indices)
    np.testing.assert_array_equal(sel0.valid, sel1.valid)
    assert not np.allclose(w0, w1)
    clamped = np.clip(np.take_along_axis(np.asarray(s), np.asarray(sel0.indices), -1), 0, 1)
    d0, d1 = clamped - np.asarray(w0), clamped - np.asarray(w1)
    np.testing.assert_allclose(np.sort(d0, -1), np.sort(d1, -1), atol=1e-6)  # same discards, re-paired


def test_train_select_gradient_reaches_best_discards():
    s = jnp.array([[0.9, -0.4, 0.3, 0.7, 1.5, 0.1, 0.6, -0.2]])
    k = 4  # kept: 1.5, 0.9, 0.7, 0.6; discards in rank order: 0.3, 0.1, -0.2, -0.4
    grad = lambda flip: np.asarray(jax.grad(lambda x: train_select(x, k, flip=flip)[1].sum())(s))[0]
    # Kept scores inside (0, 1) gain weight (+1); the two discards inside (0, 1) are penalised (−1);
    # scores outside (0, 1) get nothing through the clamp.
    expected = np.array([1.0, 0.0, -1.0, 1.0, 0.0, -1.0, 1.0, 0.0])
    np.testing.assert_array_equal(grad(False), expected)
    np.testing.assert_array_equal(grad(True), expected)
    sel, w = jax.jit(lambda x, f: train_select(x, k, flip=f))(s, jnp.array(False))
    np.testing.assert_array_equal(sel.indices, [[0, 3, 4, 6]])
    np.testing.assert_allclose(w, [[0.9 - 0.1, 0.7 - 0.0, 1.0 - 0.3, 0.6 - 0.0]], atol=1e-6)


def test_train_select_requires_flip_with_penalty():
    with pytest.raises(ValueError, match="flip"):
        train_select(jnp.zeros((1, 4)), 2)
    sel, w = train_select(jnp.array([[0.5, 2.0, -1.0, 0.1]]), 2, discard_penalty=False)
    np.testing.assert_array_equal(sel.indices, [[0, 1]])
    np.testing.assert_array_equal(w, [[0.5, 1.0]])


# --- inference selection -------------------------------------------------------------------------


@given(seed=st.integers(0, 2**31 - 1), threshold=st.sampled_from([0.0, 0.3, -0.5]),
       cap_frac=st.sampled_from([0.4, 0.75, 1.0]))
def test_infer_select_matches_brute_force(seed, threshold, cap_frac):
    rng = np.random.default_rng(seed)
    s = rng.uniform(-1.0, 1.5, (3, 11)).astype(np.float32)
    valid = rng.random((3, 11)) < 0.85
    cap = routing.capacity(11, cap_frac)
    sel, w = infer_select(jnp.asarray(s), cap, threshold=threshold, valid=jnp.asarray(valid))
    for i in range(3):
        kept = [t for t in range(11) if s[i, t] > threshold and valid[i, t]][:cap]
        got_valid = np.asarray(sel.valid[i])
        assert got_valid.sum() == len(kept)
        np.testing.assert_array_equal(np.asarray(sel.indices[i])[got_valid], kept)
        np.testing.assert_allclose(np.asarray(w[i])[got_valid], np.clip(s[i, kept], 0, 1))
        np.testing.assert_array_equal(np.asarray(w[i])[~got_valid], 0.0)


def _kept_up_to(selection, t: int) -> list[list[tuple[int, float]]]:
    sel, w = (np.asarray(a) for a in (selection[0].indices, selection[1]))
    ok = np.asarray(selection[0].valid) & (sel <= t)
    return [list(zip(sel[i][ok[i]].tolist(), w[i][ok[i]].tolist(), strict=True)) for i in range(sel.shape[0])]


def test_infer_select_is_causal():
    rng = np.random.default_rng(6)
    s = rng.uniform(-1.0, 1.0, (2, 16)).astype(np.float32)
    cap = 6
    base = infer_select(jnp.asarray(s), cap)
    for t in (3, 8, 12):
        perturbed = s.copy()
        perturbed[:, t + 1:] = rng.uniform(-1.0, 1.0, perturbed[:, t + 1:].shape)
        assert _kept_up_to(infer_select(jnp.asarray(perturbed), cap), t) == _kept_up_to(base, t)


# --- upsampling ----------------------------------------------------------------------------------


def _x_and_selection(seed=7, b=2, n=10, d=4, k=6):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, n, d)).astype(np.float32))
    sel, w = train_select(jnp.asarray(rng.standard_normal((b, n)).astype(np.float32)), k, flip=False)
    return rng, x, sel, w


def test_upsample_round_trip_is_exact():
    _, x, sel, _ = _x_and_selection()
    out = upsample(x, routing.gather(x, sel), sel, jnp.ones(sel.indices.shape))
    np.testing.assert_array_equal(out, x)


def test_upsample_matches_numpy_and_keeps_dropped_rows():
    rng, x, sel, w = _x_and_selection()
    y = jnp.asarray(rng.standard_normal(sel.indices.shape + (x.shape[-1],)).astype(np.float32))
    idx = np.asarray(sel.indices)
    dropped = np.ones(x.shape[:2], bool)
    np.put_along_axis(dropped, idx, False, axis=1)

    out1 = np.asarray(upsample(x, y, sel, jnp.ones(idx.shape)))
    np.testing.assert_allclose(np.take_along_axis(out1, idx[..., None], 1), y, atol=1e-6)

    out = np.asarray(upsample(x, y, sel, w))
    ref = np.array(x)
    for i in range(x.shape[0]):
        for j, t in enumerate(idx[i]):
            ref[i, t] = w[i, j] * y[i, j] + (1 - w[i, j]) * x[i, t]
    np.testing.assert_allclose(out, ref, atol=1e-6)
    for o in (out, out1):
        np.testing.assert_array_equal(o[dropped], np.asarray(x)[dropped])  # bit-for-bit


def test_upsample_invalid_slots_write_nothing():
    x = jnp.arange(12.0).reshape(1, 4, 3)
    sel = Selection(jnp.array([[0, 2, 2]]), jnp.array([[True, True, False]]))
    y = jnp.full((1, 3, 3), 100.0)
    out = upsample(x, y, sel, jnp.array([[1.0, 1.0, 0.0]]))
    np.testing.assert_array_equal(out[0, 2], [100.0, 100.0, 100.0])
    np.testing.assert_array_equal(out[0, 1], x[0, 1])
    np.testing.assert_array_equal(out[0, 3], x[0, 3])


def test_upsample_weight_gradient():
    rng, x, sel, w = _x_and_selection()
    y = jnp.asarray(rng.standard_normal(sel.indices.shape + (x.shape[-1],)).astype(np.float32))
    i, j = 1, 2
    tangent = jnp.zeros_like(w).at[i, j].set(1.0)
    _, d_out = jax.jvp(lambda w_: upsample(x, y, sel, w_), (w,), (tangent,))
    t = int(sel.indices[i, j])
    np.testing.assert_allclose(d_out[i, t], y[i, j] - x[i, t], atol=1e-6)
    d_out = np.array(d_out)
    d_out[i, t] = 0.0
    assert not np.any(d_out)


# --- bypass and its gradient-side limit ----------------------------------------------------------


def test_bypass_identity_and_formula():
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, 5, 6)).astype(np.float32))
    u = jnp.asarray(rng.standard_normal((2, 5, 6)).astype(np.float32))
    for c in (np.zeros(6), np.ones(6), rng.uniform(-2, 3, 6)):
        c = jnp.asarray(c, jnp.float32)
        np.testing.assert_array_equal(bypass(x, x, c), x)
        np.testing.assert_allclose(bypass(x, u, c), np.asarray(x) + np.asarray(c) * (u - x), atol=1e-6)


C = jnp.array([0.1, 0.1, 0.5, 0.5, 1.2, 1.2, 0.1, 1.2])
G = jnp.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 0.0, 0.0])


def _limited(c, g, c_min=0.3, c_max=1.0, active=True):
    out, vjp = jax.vjp(lambda c_: limit_grad(c_, c_min, c_max, active), c)
    np.testing.assert_array_equal(out, c)
    return np.asarray(vjp(g)[0])


def test_limit_grad_flips_exactly_where_specified():
    expected = np.array([-1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 0.0, 0.0])  # flips: (c<min, g>0), (c>max, g<0)
    np.testing.assert_array_equal(_limited(C, G), expected)
    np.testing.assert_array_equal(_limited(C, G, active=False), G)
    np.testing.assert_array_equal(_limited(C, G, active=jnp.array(False)), G)


def test_limit_grad_descent_moves_c_into_range():
    c_min, c_max, lr = 0.3, 1.0, 0.05
    stepped = np.asarray(C) - lr * _limited(C, G, c_min, c_max)
    below, above = np.asarray(C) < c_min, np.asarray(C) > c_max
    moved = np.asarray(G) != 0
    assert np.all(stepped[below & moved] > np.asarray(C)[below & moved])  # climbs back towards c_min
    assert np.all(stepped[above & moved] < np.asarray(C)[above & moved])  # falls back towards c_max


def test_limit_grad_with_traced_schedule():
    @jax.jit
    def grad(c, g, step, active):
        return jax.vjp(lambda c_: limit_grad(c_, bypass_min(step), BYPASS_MAX, active), c)[1](g)[0]

    c, g = jnp.array([0.5, 0.5]), jnp.array([1.0, -1.0])
    np.testing.assert_array_equal(grad(c, g, 0, True), [-1.0, -1.0])  # c_min 0.9 > c
    np.testing.assert_array_equal(grad(c, g, 20000, True), [1.0, -1.0])  # c_min 0.2 < c


# --- parameter owners ----------------------------------------------------------------------------


class _Pair(nnx.Module):
    def __init__(self, d, *, rngs):
        self.scorer = Scorer(d, rngs=rngs)
        self.bypass = Bypass(d, rngs=rngs)


def test_scorer_and_bypass_params():
    d = 64
    pair = _Pair(d, rngs=nnx.Rngs(0))
    w = np.asarray(pair.scorer.weight[...])
    assert w.shape == (d,) and np.all(np.abs(w) <= 1 / math.sqrt(d)) and w.std() > 0.2 / math.sqrt(d)
    np.testing.assert_array_equal(pair.bypass.scale[...], np.full(d, 0.5, np.float32))
    assert isinstance(pair.scorer.weight, ScorerParam) and isinstance(pair.bypass.scale, BypassParam)
    assert isinstance(pair.scorer.weight, nnx.Param)
    assert len(jax.tree.leaves(nnx.state(pair, ScorerParam))) == 1
    assert len(jax.tree.leaves(nnx.state(pair, BypassParam))) == 1
    assert len(jax.tree.leaves(nnx.state(pair, nnx.Param))) == 2

    x = np.random.default_rng(9).standard_normal((2, 3, d)).astype(np.float32)
    np.testing.assert_allclose(pair.scorer(jnp.asarray(x)), x @ w, rtol=1e-5, atol=1e-6)


def test_bypass_module_applies_limit_only_when_asked():
    module = Bypass(4)
    rng = np.random.default_rng(10)
    x = jnp.asarray(rng.standard_normal((1, 3, 4)).astype(np.float32))
    u = x + 1.0  # ∂(sum z)/∂c = sum(u − x) = 3 > 0 per channel

    def grad(**kw):
        return nnx.grad(lambda m: m(x, u, **kw).sum())(module).scale[...]

    np.testing.assert_allclose(grad(), np.full(4, 3.0), rtol=1e-6)
    np.testing.assert_allclose(grad(limit_active=True, step=0), np.full(4, -3.0), rtol=1e-6)
    np.testing.assert_allclose(grad(limit_active=False, step=0), np.full(4, 3.0), rtol=1e-6)
    np.testing.assert_allclose(grad(limit_active=True, step=30000), np.full(4, 3.0), rtol=1e-6)
    # Without a step c_min is the schedule's default 0 (not step 0's 0.9): c = 0.5 is left alone,
    # c = -0.1 (below 0) still has its positive gradient flipped.
    np.testing.assert_allclose(grad(limit_active=True), np.full(4, 3.0), rtol=1e-6)
    below = Bypass(4, init=-0.1)
    flipped = nnx.grad(lambda m: m(x, u, limit_active=True).sum())(below).scale[...]
    np.testing.assert_allclose(flipped, np.full(4, -3.0), rtol=1e-6)


def test_a_narrower_margin_acts_inside_the_spec_band():
    """67% positive is inside the spec's band (keep 0.64 ± 0.05): the default margin leaves the
    gradient alone; margin 0.01 (band [0.63, 0.65]) pushes the scores down, by the same 4% rescaled
    correction; 64% is inside both."""
    g = np.random.default_rng(5).standard_normal((1, 4000)).astype(np.float32)

    def correction(s, margin):
        fn = lambda x: balance(x, keep=KEEP, active=True, statistic="proportion", margin=margin)
        return (np.asarray(jax.vjp(fn, jnp.asarray(s))[1](jnp.asarray(g))[0]) - g) / np.abs(g)

    high = _skewed_scores(0.67)
    assert float(positive_fraction(jnp.asarray(high))) == pytest.approx(0.67)
    np.testing.assert_array_equal(correction(high, 0.05), 0.0)
    pushed = correction(high, 0.01)
    assert math.sqrt((pushed.astype(np.float64) ** 2).mean()) == pytest.approx(0.04, rel=1e-3)
    assert np.mean(high - 3.0 * pushed > 0) < 0.67  # a descent step lowers the fraction
    np.testing.assert_array_equal(correction(_skewed_scores(0.64), 0.01), 0.0)


# --- weights as attention bias (option weight_attn_bias, icefall's log-weight key bias) ---------------


def _biased_reference(q, k, v, bias, pos, seg):
    """softmax(q·k/√d + bias_j) over the visible keys, written out in fp32 (GQA by repeating kv)."""
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]
    visible = ((pos[:, None, :] <= pos[:, :, None]) & (seg[:, :, None] == seg[:, None, :])
               & (seg[:, :, None] >= 0))[:, None]
    logits = jnp.where(visible, logits, -jnp.inf)
    m = jnp.max(jnp.where(visible, logits, -1e30), axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(logits - m), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def test_key_biased_attention_matches_the_written_out_reference():
    rng = np.random.default_rng(21)
    b, t, h, hkv, d = 2, 12, 4, 2, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, n, d)).astype(np.float32))
               for n in (h, hkv, hkv))
    w = jnp.asarray(rng.uniform(0.0, 1.0, (b, t)).astype(np.float32)).at[:, 3].set(0.0)
    bias = key_bias(w)
    # ragged: two packed documents in row 0, padding at the end of row 1; compacted positions
    pos = jnp.asarray(np.sort(rng.choice(40, (b, t), replace=False), axis=1).astype(np.int32))
    seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 9 + [-1] * 3], jnp.int32)
    got = key_biased_attention(q, k, v, bias, q_positions=pos, kv_positions=pos,
                               q_segment_ids=seg, kv_segment_ids=seg)
    want = _biased_reference(q, k, v, bias, pos, seg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[1, 9:], 0.0)  # padding rows see nothing
    # the bias matters: without it the output differs
    plain = _biased_reference(q, k, v, jnp.zeros_like(bias), pos, seg)
    assert float(jnp.abs(plain - want).max()) > 1e-2

    cot = jnp.asarray(rng.standard_normal(want.shape).astype(np.float32))
    valid = (seg >= 0)[:, :, None, None]

    def loss(fn):
        return lambda q, k, v, w: jnp.sum(jnp.where(valid, fn(q, k, v, key_bias(w)), 0.0) * cot)

    ours = jax.grad(loss(lambda q, k, v, bb: key_biased_attention(
        q, k, v, bb, q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)),
        argnums=(0, 1, 2, 3))(q, k, v, w)
    ref = jax.grad(loss(lambda q, k, v, bb: _biased_reference(q, k, v, bb, pos, seg)),
                   argnums=(0, 1, 2, 3))(q, k, v, w)
    for a, r in zip(ours, ref, strict=True):
        np.testing.assert_allclose(a, r, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(ref[3]).max()) > 1e-3  # the weights get a gradient through the bias


def test_key_bias_is_log_w_plus_eps():
    w = jnp.asarray([[0.0, 0.5, 1.0]])
    np.testing.assert_allclose(key_bias(w), np.log(np.array([[1e-3, 0.501, 1.001]])), rtol=1e-6, atol=1e-6)
