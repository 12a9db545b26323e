"""The "chunked" backend (flash-style tiles, online softmax, custom_vjp) equals the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokensparse.attention import attention, reference_attention
from tokensparse.chunked_attention import chunked_attention
from tokensparse.metrics import compiled_memory

B, T, D = 2, 40, 8


def _inputs(h, hkv, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(3 * rng.normal(size=(B, T, h, D)), dtype)
    k = jnp.asarray(3 * rng.normal(size=(B, T, hkv, D)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, hkv, D)), dtype)
    pos = jnp.asarray(np.sort(rng.choice(4 * T, (B, T), replace=False), axis=1), jnp.int32)
    seg = np.where(np.arange(T) < 15, 0, 1)[None].repeat(B, 0)
    seg[1, :3] = -1  # padding rows: see nothing
    seg[0, 20] = -1
    ct = jnp.asarray(rng.normal(size=(B, T, h, D)), jnp.float32)
    return (q, k, v), pos, jnp.asarray(seg, jnp.int32), ct


@pytest.mark.parametrize("h, hkv", [(4, 1), (4, 2), (4, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_forward_and_gradients_match_reference(h, hkv, causal):
    qkv, pos, seg, ct = _inputs(h, hkv)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg,
              causal=causal)
    chunked = jax.jit(lambda q, k, v: attention(q, k, v, backend="chunked", **kw))
    out, vjp = jax.vjp(chunked, *qkv)
    want, vjp_ref = jax.vjp(lambda q, k, v: reference_attention(q, k, v, **kw), *qkv)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for a, b in zip(vjp(ct.astype(out.dtype)), vjp_ref(ct), strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, atol=2e-5)
    padded = np.asarray(seg) < 0
    assert np.all(np.asarray(out)[padded] == 0)


@pytest.mark.parametrize("block_q, block_k", [(16, 8), (8, 16), (32, 32)])
def test_multi_tile_padding_and_skipping_match_reference(block_q, block_k):
    """Several tiles per row and column, partial last tiles (T=40), causal tiles skipped, GQA."""
    qkv, pos, seg, ct = _inputs(4, 2, seed=1)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    tiled = jax.jit(lambda q, k, v: chunked_attention(q, k, v, block_q=block_q, block_k=block_k, **kw))
    out, vjp = jax.vjp(tiled, *qkv)
    want, vjp_ref = jax.vjp(lambda q, k, v: reference_attention(q, k, v, **kw), *qkv)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for a, b in zip(vjp(ct), vjp_ref(ct), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_queries_and_keys_of_different_lengths():
    """A subset of queries (e.g. compacted tokens) against all keys, with tiles of 8."""
    (q, k, v), pos, seg, ct = _inputs(4, 2, seed=2)
    rows = np.arange(3, T, 2)  # 19 queries
    qs, qpos, qseg, cts = q[:, rows], pos[:, rows], seg[:, rows], ct[:, rows]
    kw = dict(q_positions=qpos, kv_positions=pos, q_segment_ids=qseg, kv_segment_ids=seg)
    out, vjp = jax.vjp(lambda q, k, v: chunked_attention(q, k, v, block_q=8, block_k=8, **kw), qs, k, v)
    want, vjp_ref = jax.vjp(lambda q, k, v: reference_attention(q, k, v, **kw), qs, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for a, b in zip(vjp(cts), vjp_ref(cts), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_bf16_close_to_reference():
    qkv, pos, seg, _ = _inputs(4, 2, jnp.bfloat16)
    kw = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    out = jax.jit(lambda q, k, v: attention(q, k, v, backend="chunked", **kw))(*qkv)
    want = reference_attention(*(x.astype(jnp.float32) for x in qkv), **kw)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


def test_memory_is_linear_in_length():
    def temp(t):
        x = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32)
        p = jax.ShapeDtypeStruct((1, t), jnp.int32)

        def loss(q, k, v, pos):
            return jnp.sum(attention(q, k, v, q_positions=pos, kv_positions=pos, backend="chunked"))

        return compiled_memory(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), x, x, x, p).temp_bytes

    assert temp(4096) < 2.5 * temp(2048)
