"""Position/segment-masked GQA attention vs a float64 NumPy definition; backend dispatch."""

from __future__ import annotations

import functools
import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokensparse import attention as A
from tokensparse import backends, routing

BACKENDS = ["reference", "xla"]
B, T, H, D = 2, 6, 4, 8
seeds = st.integers(0, 2**32 - 1)

# scale is traced (not static) so hypothesis can vary it without recompiling.
ref_jit = jax.jit(A.reference_attention, static_argnames="causal")
attn_jit = jax.jit(A.attention, static_argnames=("causal", "scale", "backend"))


# ----------------------------------------------------------------------------- brute force


def np_attention(q, k, v, q_pos, kv_pos, q_seg=None, kv_seg=None, *, causal=True, scale=None):
    """Masked softmax attention in float64, one query row at a time over its visible keys."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    q_pos, kv_pos = np.asarray(q_pos), np.asarray(kv_pos)
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    q_seg = np.zeros((b, tq), int) if q_seg is None else np.asarray(q_seg)
    kv_seg = np.zeros((b, tk), int) if kv_seg is None else np.asarray(kv_seg)
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    out = np.zeros((b, tq, h, d))
    for bi in range(b):
        visible = (q_seg[bi][:, None] == kv_seg[bi][None, :]) & (q_seg[bi][:, None] >= 0)
        if causal:
            visible &= kv_pos[bi][None, :] <= q_pos[bi][:, None]
        for hi in range(h):
            kh = hi // (h // hkv)  # query heads [kh*G, (kh+1)*G) share kv head kh
            for i in range(tq):
                seen = np.flatnonzero(visible[i])
                if seen.size == 0:
                    continue  # no visible key: the row stays zero
                logits = k[bi, seen, kh] @ q[bi, i, hi] * scale
                p = np.exp(logits - logits.max())
                out[bi, i, hi] = (p / p.sum()) @ v[bi, seen, kh]
    return out


def make_qkv(rng, b=B, tq=T, tk=T, h=H, hkv=H, d=D, scale=1.0):
    q = rng.normal(size=(b, tq, h, d)) * scale
    k = rng.normal(size=(b, tk, hkv, d)) * scale
    v = rng.normal(size=(b, tk, hkv, d))
    return [jnp.asarray(a, jnp.float32) for a in (q, k, v)]


def random_layout(rng, b=B, t=T, n_seg=2, pad=True):
    positions = rng.integers(0, 2 * t, size=(b, t)).astype(np.int32)
    segments = rng.integers(-1 if pad else 0, n_seg, size=(b, t)).astype(np.int32)
    return jnp.asarray(positions), jnp.asarray(segments)


def packed_layout(b=B, t=T, split=3):
    """Two documents packed in a row: positions restart at 0 for the second one."""
    pos = np.concatenate([np.arange(split), np.arange(t - split)])
    seg = np.concatenate([np.zeros(split), np.ones(t - split)])
    return (jnp.asarray(np.tile(pos, (b, 1)), jnp.int32),
            jnp.asarray(np.tile(seg, (b, 1)), jnp.int32))


@functools.partial(jax.jit, static_argnames=("backend", "causal"))
def _value_and_grads(q, k, v, w, q_pos, kv_pos, q_seg, kv_seg, scale, *, backend, causal):
    def loss(q, k, v):
        out = A.attention(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                          kv_segment_ids=kv_seg, causal=causal, scale=scale, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def value_and_grads(q, k, v, w, q_pos, kv_pos, q_seg, kv_seg, *, backend, causal=True,
                    scale=None):
    """Output and d/d(q, k, v) of sum(out * w).

    The scale is always passed explicitly and traced (None → 1/sqrt(D), the documented default,
    which ``test_default_scale_and_segments`` checks), so each shape/backend/causal compiles once.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _value_and_grads(q, k, v, w, q_pos, kv_pos, q_seg, kv_seg, jnp.float32(scale),
                            backend=backend, causal=causal)


def self_grads(backend, q, k, v, w, pos, seg, causal=True, scale=None):
    return value_and_grads(q, k, v, w, pos, pos, seg, seg, backend=backend, causal=causal,
                           scale=scale)


def assert_close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- reference


# (kv heads, causal): MQA, GQA and MHA; one compile per backend for each.
GQA_CONFIGS = [(1, False), (2, True), (H, True)]


@pytest.mark.parametrize("hkv,causal", GQA_CONFIGS)
@given(seed=seeds, scale=st.floats(0.05, 2.0), segmented=st.booleans())
def test_reference_matches_numpy(hkv, causal, seed, scale, segmented):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, hkv=hkv)
    pos, seg = random_layout(rng)
    seg = seg if segmented else jnp.zeros_like(seg)
    w = jnp.ones(q.shape, jnp.float32)
    out, _ = self_grads("reference", q, k, v, w, pos, seg, causal=causal, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, np_attention(q, k, v, pos, pos, seg, seg, causal=causal, scale=scale))


@given(seed=seeds)
def test_reference_matches_numpy_with_different_query_and_key_lengths(seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, tq=3, tk=7, hkv=2)
    q_pos = jnp.asarray(rng.integers(0, 8, (B, 3)), jnp.int32)
    kv_pos = jnp.asarray(np.tile(np.arange(7), (B, 1)), jnp.int32)
    q_seg = jnp.asarray(rng.integers(-1, 2, (B, 3)), jnp.int32)
    kv_seg = jnp.asarray(rng.integers(-1, 2, (B, 7)), jnp.int32)
    out = ref_jit(q, k, v, q_positions=q_pos, kv_positions=kv_pos, q_segment_ids=q_seg,
                  kv_segment_ids=kv_seg)
    assert_close(out, np_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg))


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_and_segments(backend):
    """scale=None means 1/sqrt(D); no segment ids means one document."""
    rng = np.random.default_rng(0)
    q, k, v = make_qkv(rng, hkv=2, scale=2.0)
    pos, _ = random_layout(rng)
    default = attn_jit(q, k, v, q_positions=pos, kv_positions=pos, backend=backend)
    assert_close(default, np_attention(q, k, v, pos, pos, scale=D**-0.5))
    zeros = jnp.zeros((B, T), jnp.int32)
    w = jnp.ones(q.shape, jnp.float32)
    explicit, _ = self_grads(backend, q, k, v, w, pos, zeros, scale=D**-0.5)
    unscaled, _ = self_grads(backend, q, k, v, w, pos, zeros, scale=1.0)
    assert_close(default, explicit, 1e-6)
    assert np.abs(np.asarray(default) - np.asarray(unscaled)).max() > 1e-2


@given(seed=seeds, causal=st.booleans())
def test_attention_mask_matches_rule(seed, causal):
    rng = np.random.default_rng(seed)
    pos, seg = random_layout(rng)
    mask = np.asarray(A.attention_mask(pos, pos, seg, seg, causal=causal))
    p, s = np.asarray(pos), np.asarray(seg)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                visible = s[b, i] >= 0 and s[b, i] == s[b, j] and (not causal or p[b, j] <= p[b, i])
                assert mask[b, i, j] == visible


# ----------------------------------------------------------------------------- masks from positions


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds)
def test_permuting_tokens_permutes_outputs(backend, seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, hkv=2)
    pos, seg = random_layout(rng)
    perm = np.stack([rng.permutation(T) for _ in range(B)])
    take = lambda a: jnp.asarray(np.take_along_axis(
        np.asarray(a), perm.reshape(perm.shape + (1,) * (a.ndim - 2)), axis=1))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out, grads = self_grads(backend, q, k, v, w, pos, seg)
    out_p, grads_p = self_grads(backend, take(q), take(k), take(v), take(w), take(pos), take(seg))
    assert_close(out_p, take(out))
    for g_p, g in zip(grads_p, grads, strict=True):
        assert_close(g_p, take(g))


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, shift=st.integers(-50, 10_000))
def test_shifting_positions_changes_nothing(backend, seed, shift):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, hkv=2)
    pos, seg = random_layout(rng)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out, grads = self_grads(backend, q, k, v, w, pos, seg)
    out_s, grads_s = self_grads(backend, q, k, v, w, pos + shift, seg)
    assert_close(out_s, out)
    for g_s, g in zip(grads_s, grads, strict=True):
        assert_close(g_s, g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causality_by_position_not_index(backend):
    """Reversed storage order with reversed positions: a query sees the keys stored after it."""
    rng = np.random.default_rng(1)
    q, k, v = make_qkv(rng, hkv=2)
    pos = jnp.asarray([np.arange(T)[::-1]] * B, jnp.int32)
    seg = jnp.zeros((B, T), jnp.int32)
    out, _ = self_grads(backend, q, k, v, jnp.ones(q.shape), pos, seg)
    assert_close(out, np_attention(q, k, v, pos, pos))
    # The last stored token has position 0: it sees only itself, i.e. out == v of its kv head.
    assert_close(out[:, -1], jnp.repeat(v[:, -1], H // 2, axis=1))


# ----------------------------------------------------------------------------- segments and padding


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds)
def test_packed_documents_do_not_attend_across(backend, seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, hkv=2)
    pos, seg = packed_layout()
    w = jnp.ones(q.shape, jnp.float32)
    out, _ = self_grads(backend, q, k, v, w, pos, seg)
    assert_close(out, np_attention(q, k, v, pos, pos, seg, seg))
    for doc in (0, 1):
        other = (np.asarray(seg) != doc)[:, :, None, None]
        k2, v2 = (a + jnp.asarray(other * rng.normal(size=a.shape) * 3, jnp.float32)
                  for a in (k, v))
        out2, _ = self_grads(backend, q, k2, v2, w, pos, seg)
        rows = np.asarray(seg) == doc
        np.testing.assert_allclose(np.asarray(out2)[rows], np.asarray(out)[rows],
                                   rtol=1e-6, atol=1e-6)
        assert np.abs(np.asarray(out2)[~rows] - np.asarray(out)[~rows]).max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds)
def test_padding_rows_are_zero_and_padding_keys_inert(backend, seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, hkv=2)
    pos, seg = random_layout(rng, pad=False)
    pad = rng.random((B, T)) < 0.4
    pad[:, 0] = False
    seg = jnp.where(jnp.asarray(pad), -1, seg)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out, grads = self_grads(backend, q, k, v, w, pos, seg)
    assert (np.asarray(out)[pad] == 0).all()
    padm = pad[:, :, None, None]
    garbage = lambda a: jnp.where(padm, jnp.asarray(rng.normal(size=a.shape) * 3, a.dtype), a)
    out2, grads2 = self_grads(backend, garbage(q), garbage(k), garbage(v), w, pos, seg)
    assert_close(out2, out, 1e-6)
    for g, g2 in zip(grads, grads2, strict=True):
        assert np.isfinite(np.asarray(g2)).all()
        assert_close(np.where(padm, 0, g2), np.where(padm, 0, g), 1e-5)
        assert (np.asarray(g2)[pad] == 0).all()  # padding q/k/v get no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["future_positions", "foreign_segment", "padding_query"])
def test_row_without_visible_key_is_zero_with_finite_gradients(backend, case):
    rng = np.random.default_rng(2)
    q, k, v = make_qkv(rng, hkv=2)
    q_pos = jnp.asarray([[0, 4, 9, 10, 11, 12]] * B, jnp.int32)
    kv_pos = jnp.asarray([[5, 6, 7, 8, 9, 10]] * B, jnp.int32)
    q_seg = kv_seg = jnp.zeros((B, T), jnp.int32)
    empty = [0, 1]  # queries at positions 0 and 4 precede every key
    if case == "foreign_segment":
        q_pos = jnp.full((B, T), 20, jnp.int32)
        q_seg = jnp.asarray([[3, 0, 3, 0, 0, 0]] * B, jnp.int32)
        empty = [0, 2]
    elif case == "padding_query":
        q_pos = jnp.full((B, T), 20, jnp.int32)
        q_seg = jnp.asarray([[-1, 0, -1, 0, 0, 0]] * B, jnp.int32)
        empty = [0, 2]
    w = jnp.ones(q.shape, jnp.float32)
    out, grads = value_and_grads(q, k, v, w, q_pos, kv_pos, q_seg, kv_seg, backend=backend)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, empty], 0.0)
    assert_close(out, np_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg))
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    np.testing.assert_array_equal(np.asarray(grads[0])[:, empty], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["padding_key", "future_key", "empty_row"])
def test_masked_keys_with_large_logits_keep_gradients_finite(backend, case):
    """A masked key must not reach exp(): a large masked q·k (real models reach such logits, and
    padding slots hold arbitrary gathered rows) overflows to inf there, and 0 * inf poisons the
    gradients. The true output and gradients are finite (checked against NumPy / xla)."""
    q = jnp.full((B, T, H, D), 10.0, jnp.float32)
    k = jnp.ones((B, T, 2, D), jnp.float32)
    v = jnp.asarray(np.random.default_rng(7).normal(size=k.shape), jnp.float32)
    pos = jnp.asarray(np.tile(np.arange(T), (B, 1)), jnp.int32)
    seg = jnp.zeros((B, T), jnp.int32)
    q_seg = kv_seg = seg
    if case == "padding_key":  # the last key is padding holding a huge gathered row
        kv_seg = seg.at[:, -1].set(-1)
        k = k.at[:, -1].set(100.0)
    elif case == "future_key":  # the last key is in every other query's future
        k = k.at[:, -1].set(100.0)
    else:  # query 0 is alone in its segment: all of its (large) logits are masked
        q_seg = seg.at[:, 0].set(1)
        k = k * 10.0
    w = jnp.ones(q.shape, jnp.float32)
    out, grads = value_and_grads(q, k, v, w, pos, pos, q_seg, kv_seg, backend=backend)
    assert_close(out, np_attention(q, k, v, pos, pos, q_seg, kv_seg), 1e-4)
    for name, g in zip("qkv", grads, strict=True):
        g = np.asarray(g)
        assert np.isfinite(g).all(), f"d/d{name} has {np.isnan(g).sum()} NaNs of {g.size}"


# ----------------------------------------------------------------------------- compacted == masked


@functools.partial(jax.jit, static_argnames="capacity")
def compact(scores, valid, arrays, capacity):
    """topk_select, then gather every array; segment ids (last) fill invalid slots with -1."""
    sel = routing.topk_select(scores, capacity, valid)
    *rest, seg = arrays
    return sel, (*(routing.gather(a, sel) for a in rest), routing.gather(seg, sel, fill_value=-1))


@pytest.mark.parametrize("backend", BACKENDS)
@given(seed=seeds, packed=st.booleans())
def test_compacted_attention_equals_masked_full_attention(backend, seed, packed):
    """Attention over K=T gathered tokens of a 9-token sequence (positions and segment ids gathered
    alongside, invalid slots filled with segment -1) equals reference attention over all 9 tokens
    with the unselected ones masked out as queries and keys: forward and d/d(q, k, v)."""
    rng = np.random.default_rng(seed)
    n, capacity = 9, T
    q, k, v = make_qkv(rng, tq=n, tk=n, hkv=2)
    if packed:
        pos, seg = packed_layout(t=n, split=5)
    else:
        pos = jnp.asarray(np.tile(np.arange(n), (B, 1)), jnp.int32)
        seg = jnp.zeros((B, n), jnp.int32)
    scores = jnp.asarray(rng.normal(size=(B, n)), jnp.float32)
    valid = rng.random((B, n)) < 0.8
    valid[0] = True
    valid[1, :6] = [True, False, True, False, False, True]  # row 1 may fill < capacity slots
    sel, (q_c, k_c, v_c, pos_c, seg_c) = compact(scores, jnp.asarray(valid), (q, k, v, pos, seg),
                                                 capacity=capacity)
    idx, sv = np.asarray(sel.indices), np.asarray(sel.valid)
    w = rng.normal(size=(B, capacity, H, D)).astype(np.float32)

    # Compacted: differentiate w.r.t. the gathered arrays and chain back to the full sequence with
    # a NumPy scatter (every slot, valid or not).
    out_c, g_slots = value_and_grads(q_c, k_c, v_c, jnp.asarray(w), pos_c, pos_c, seg_c, seg_c,
                                     backend=backend)
    g_c = []
    for g in g_slots:
        full = np.zeros((B, n) + g.shape[2:], np.float32)
        for i in range(B):
            np.add.at(full[i], idx[i], np.asarray(g[i]))
        g_c.append(full)

    # Masked: the full sequence, unselected tokens given segment -1, read at the selected rows.
    selected = np.zeros((B, n), bool)
    w_full = np.zeros((B, n, H, D), np.float32)
    for i in range(B):
        selected[i, idx[i][sv[i]]] = True
        w_full[i, idx[i][sv[i]]] = w[i][sv[i]]
    seg_m = jnp.where(jnp.asarray(selected), seg, -1)
    out_m, g_m = value_and_grads(q, k, v, jnp.asarray(w_full), pos, pos, seg_m, seg_m,
                                 backend="reference")

    out_c = np.asarray(out_c)
    assert_close(out_c[sv], np.take_along_axis(np.asarray(out_m), idx[:, :, None, None], 1)[sv])
    np.testing.assert_array_equal(out_c[~sv], 0.0)
    for name, a, b in zip("qkv", g_c, g_m, strict=True):
        assert np.isfinite(a).all(), name
        assert_close(a, b)
        # Unselected tokens neither query nor serve as keys/values: no gradient at all.
        np.testing.assert_array_equal(a[~selected], 0.0)


# ----------------------------------------------------------------------------- xla vs reference


@pytest.mark.parametrize("hkv,causal", GQA_CONFIGS)
@given(seed=seeds, scale=st.floats(0.05, 2.0))
def test_xla_matches_reference_forward_and_gradients(hkv, causal, seed, scale):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, hkv=hkv)
    pos, seg = random_layout(rng)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out_r, g_r = self_grads("reference", q, k, v, w, pos, seg, causal, scale)
    out_x, g_x = self_grads("xla", q, k, v, w, pos, seg, causal, scale)
    assert_close(out_x, out_r)
    for a, b in zip(g_x, g_r, strict=True):
        assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_scale_matches_numpy(backend):
    rng = np.random.default_rng(4)
    q, k, v = make_qkv(rng, hkv=2)
    pos, seg = random_layout(rng)
    out, _ = self_grads(backend, q, k, v, jnp.ones(q.shape, jnp.float32), pos, seg, scale=0.3)
    assert_close(out, np_attention(q, k, v, pos, pos, seg, seg, scale=0.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend):
    rng = np.random.default_rng(5)
    q, k, v = (a.astype(jnp.bfloat16) for a in make_qkv(rng, hkv=2))
    pos, seg = packed_layout()
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    out, grads = self_grads(backend, q, k, v, w, pos, seg)
    assert out.dtype == jnp.bfloat16
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    expected = np_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                            np.asarray(pos), np.asarray(pos), seg, seg)
    assert_close(out.astype(jnp.float32), expected, tol=2e-2)
    _, grads32 = self_grads("reference", *(a.astype(jnp.float32) for a in (q, k, v)), w, pos, seg)
    for g, g32 in zip(grads, grads32, strict=True):
        g = np.asarray(g.astype(jnp.float32))
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, np.asarray(g32), rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------- dispatch


def _small_inputs():
    rng = np.random.default_rng(6)
    q, k, v = make_qkv(rng, b=1, tq=4, tk=4, h=2, hkv=1, d=4)
    pos = jnp.asarray([[0, 1, 2, 3]], jnp.int32)
    return q, k, v, dict(q_positions=pos, kv_positions=pos)


@pytest.fixture
def registry():
    """Register throw-away backends; remove them afterwards."""
    added = []

    def add(name, backend):
        assert name not in A.backends()
        A.register_backend(name, backend)
        added.append(name)

    yield add
    for name in added:
        backends.unregister(A.KIND, name)


class Spy:
    def __init__(self):
        self.calls = []

    def __call__(self, q, k, v, **kwargs):
        self.calls.append(kwargs)
        return A.reference_attention(q, k, v, **kwargs) + 1.0  # recognisable output


def test_auto_backend_matches_reference():
    assert inspect.signature(A.attention).parameters["backend"].default == "auto"
    rng = np.random.default_rng(8)
    q, k, v = make_qkv(rng, hkv=2)
    pos, seg = random_layout(rng)
    out = attn_jit(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                   kv_segment_ids=seg, backend="auto")
    assert out.shape == q.shape and out.dtype == q.dtype
    ref, _ = self_grads("reference", q, k, v, jnp.ones(q.shape), pos, seg)
    assert_close(out, ref)


def test_unknown_backend_lists_registered_ones():
    q, k, v, kw = _small_inputs()
    with pytest.raises(ValueError, match="flashy") as info:
        A.attention(q, k, v, **kw, backend="flashy")
    for name in ("reference", "xla"):
        assert name in str(info.value)
    assert {"reference", "xla"} <= set(A.backends())


def test_unsupported_named_backend_raises_and_auto_falls_back_to_xla(registry):
    spy = Spy()
    registry("spy_unsupported", A.Backend(spy, supports=lambda *a, **kw: "needs a TPU",
                                          priority=3))
    q, k, v, kw = _small_inputs()
    with pytest.raises(ValueError, match=r"'spy_unsupported' cannot run here: needs a TPU\. "
                                         r"Use backend='xla'") as info:
        A.attention(q, k, v, **kw, backend="spy_unsupported")
    assert "\n" not in str(info.value)
    assert spy.calls == []
    # "auto" skips an unsupported candidate silently.
    xla = A.attention(q, k, v, **kw, backend="xla")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_close(A.attention(q, k, v, **kw, backend="auto"), xla)
    assert A.resolve("auto", q, k, v) == "xla"
    assert spy.calls == []


def test_auto_picks_highest_priority_supported_backend(registry):
    low, high, unsupported = Spy(), Spy(), Spy()
    asked = []

    def supports(q, k, v, *, causal):
        asked.append((q.shape, k.shape, v.shape, causal))
        return None

    registry("spy_low", A.Backend(low, priority=1))
    registry("spy_high", A.Backend(high, supports=supports, priority=2))
    registry("spy_top_unsupported", A.Backend(unsupported, supports=lambda *a, **kw: "no",
                                              priority=9))
    q, k, v, kw = _small_inputs()
    seg = jnp.asarray([[0, 0, 1, 1]], jnp.int32)
    out = A.attention(q, k, v, **kw, q_segment_ids=seg, kv_segment_ids=seg, causal=False,
                      scale=0.5)
    assert len(high.calls) == 1 and low.calls == [] and unsupported.calls == []
    assert asked == [(q.shape, k.shape, v.shape, False)]
    call_kw = high.calls[0]
    assert call_kw["causal"] is False and call_kw["scale"] == 0.5
    assert call_kw["q_segment_ids"] is seg and call_kw["kv_segment_ids"] is seg
    ref = A.attention(q, k, v, **kw, q_segment_ids=seg, kv_segment_ids=seg, causal=False,
                      scale=0.5, backend="reference")
    assert A.resolve("auto", q, k, v, causal=False) == "spy_high"
    assert_close(out, np.asarray(ref) + 1.0)
    # Explicitly named backends run even with a lower priority.
    A.attention(q, k, v, **kw, backend="spy_low")
    assert len(low.calls) == 1


def test_zero_priority_backend_is_not_picked_by_auto(registry):
    spy = Spy()
    registry("spy_zero", A.Backend(spy))
    q, k, v, kw = _small_inputs()
    A.attention(q, k, v, **kw, backend="auto")
    assert spy.calls == []


# ----------------------------------------------------------------------------- shape errors


@pytest.mark.parametrize("shapes,match", [
    (((1, 4, 2, 8), (1, 4, 2, 4), (1, 4, 2, 4)), "head_dim"),
    (((1, 4, 3, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "multiple"),
    (((1, 4, 2, 8), (1, 4, 2, 8), (1, 5, 2, 8)), "differ"),
    (((1, 4, 2, 8), (1, 4, 1, 8), (1, 4, 2, 8)), "differ"),
    (((2, 4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "batch"),
    (((4, 2, 8), (1, 4, 2, 8), (1, 4, 2, 8)), "expects"),
])
def test_shape_errors(shapes, match):
    q, k, v = (np.zeros(s, np.float32) for s in shapes)
    pos = np.zeros((1, 4), np.int32)
    for backend in ("auto", "reference", "xla"):
        with pytest.raises(ValueError, match=match):
            A.attention(q, k, v, q_positions=pos, kv_positions=pos, backend=backend)
