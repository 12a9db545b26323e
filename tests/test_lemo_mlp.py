"""LeMo's channel-sparse SwiGLU backward against dense autodiff with independently masked
intermediate gradients; exact forward; no weight gradients; smaller saved activations. The
recomputed MLP against the module's own autodiff."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse.config import LoRAConfig, preset
from tokensparse.lemo.mlp import channel_sparse_swiglu, keep_channels, recomputed_mlp, sparse_backward_mlp
from tokensparse.llama import MLP, Llama, swiglu
from tokensparse.lora import add_lora
from tokensparse.metrics import compiled_memory

B, T, D, FFN = 2, 12, 16, 48


def weights(seed=0, d=D, i=FFN):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, d)).astype(np.float32)
    w_gate = (rng.standard_normal((d, i)) / np.sqrt(d)).astype(np.float32)
    w_up = (rng.standard_normal((d, i)) / np.sqrt(d)).astype(np.float32)
    w_down = (rng.standard_normal((i, d)) / np.sqrt(i)).astype(np.float32)
    cot = rng.standard_normal((B, T, d)).astype(np.float32)
    return x, w_gate, w_up, w_down, cot


def dense_mlp(x, w_gate, w_up, w_down):
    return swiglu(x, lambda h: jnp.dot(h, w_gate), lambda h: jnp.dot(h, w_up),
                  lambda h: jnp.dot(h, w_down))


def np_top_channels(x, w_gate, w_up, keep):
    """Ranking in float64 NumPy: r_c = ||silu(g)_c||_2 + ||v_c||_2 over all B*T tokens."""
    x64 = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    g = x64 @ w_gate
    v = x64 @ w_up
    a = g / (1.0 + np.exp(-g))
    r = np.linalg.norm(a, axis=0) + np.linalg.norm(v, axis=0)
    order = np.argsort(-r, kind="stable")
    if keep < len(r):  # the ranking must be unambiguous in fp32
        assert r[order[keep - 1]] - r[order[keep]] > 1e-4 * r.max()
    return np.sort(order[:keep])


def masked_reference_dx(x, w_gate, w_up, w_down, cot, kept):
    """Dense VJP up to the intermediates (g, v), zero the dropped channels, then back to x."""
    g, v = jnp.dot(x, w_gate), jnp.dot(x, w_up)
    _, vjp = jax.vjp(lambda g, v: jnp.dot(jax.nn.silu(g) * v, w_down), g, v)
    grad_g, grad_v = vjp(jnp.asarray(cot))
    mask = np.zeros(w_gate.shape[1], np.float32)
    mask[kept] = 1.0
    return jnp.dot(grad_g * mask, w_gate.T) + jnp.dot(grad_v * mask, w_up.T)


sparse_jit = jax.jit(channel_sparse_swiglu, static_argnums=4)


def sparse_vjp(x, w_gate, w_up, w_down, cot, keep):
    @jax.jit
    def run(x, w_gate, w_up, w_down, cot):
        out, vjp = jax.vjp(lambda *a: channel_sparse_swiglu(*a, keep), x, w_gate, w_up, w_down)
        return out, vjp(cot)

    return run(x, w_gate, w_up, w_down, cot)


def test_forward_equals_dense_swiglu():
    x, w_gate, w_up, w_down, _ = weights(1)
    want = jax.jit(dense_mlp)(x, w_gate, w_up, w_down)
    for keep in (FFN, 7):
        got = sparse_jit(x, w_gate, w_up, w_down, keep)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_all_channels_vjp_equals_dense_vjp():
    x, w_gate, w_up, w_down, cot = weights(2)
    _, dense_vjp = jax.vjp(lambda x: dense_mlp(x, w_gate, w_up, w_down), x)
    (want,) = dense_vjp(cot)
    _, (dx, *_) = sparse_vjp(x, w_gate, w_up, w_down, cot, FFN)
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("keep", [1, 9, 24, FFN - 1])
def test_sparse_vjp_equals_masked_dense_vjp(keep):
    x, w_gate, w_up, w_down, cot = weights(3)
    kept = np_top_channels(x, w_gate, w_up, keep)
    want = masked_reference_dx(x, w_gate, w_up, w_down, cot, kept)
    _, (dx, *_) = sparse_vjp(x, w_gate, w_up, w_down, cot, keep)
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5)
    # ... and it really is approximate: the full gradient differs.
    full = masked_reference_dx(x, w_gate, w_up, w_down, cot, np.arange(FFN))
    assert not np.allclose(dx, full, rtol=1e-3, atol=1e-3)


def test_channels_ranked_over_the_whole_batch():
    """One channel set for all rows: row 0 alone decides it when row 1 is near zero."""
    x, w_gate, w_up, w_down, cot = weights(4)
    x[1] *= 1e-3
    keep = 10
    kept = np_top_channels(x, w_gate, w_up, keep)
    kept_row0 = np_top_channels(x[:1], w_gate, w_up, keep)
    np.testing.assert_array_equal(kept, kept_row0)
    _, (dx, *_) = sparse_vjp(x, w_gate, w_up, w_down, cot, keep)
    want = masked_reference_dx(x, w_gate, w_up, w_down, cot, kept)
    np.testing.assert_allclose(dx, want, rtol=1e-5, atol=1e-5)


def test_weight_gradients_are_zero():
    x, w_gate, w_up, w_down, cot = weights(5)
    _, (dx, *w_grads) = sparse_vjp(x, w_gate, w_up, w_down, cot, 12)
    assert np.abs(np.asarray(dx)).max() > 0
    for grad, w in zip(w_grads, (w_gate, w_up, w_down), strict=True):
        assert grad.shape == w.shape
        np.testing.assert_array_equal(grad, 0.0)


def test_low_precision_dtypes_round_trip():
    x, w_gate, w_up, w_down, cot = (jnp.asarray(a, jnp.bfloat16) for a in weights(6))
    out, (dx, *_) = sparse_vjp(x, w_gate, w_up, w_down, cot, 12)
    assert out.dtype == dx.dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(dx, np.float32)).all()


def test_keep_validation_and_keep_channels():
    x, w_gate, w_up, w_down, _ = weights(0)
    for bad in (0, FFN + 1, 2.5):
        with pytest.raises(ValueError, match="keep"):
            channel_sparse_swiglu(x, w_gate, w_up, w_down, bad)
    assert keep_channels(11008) == 2201  # floor(11008 * 0.2) = floor(2201.6)
    assert keep_channels(10) == 2  # 10 * (1 - 0.8) must not round down to 1
    assert keep_channels(512) == 102
    assert keep_channels(128, 0.5) == 64
    assert keep_channels(3) == 1  # at least one channel
    assert keep_channels(64, 0.0) == 64
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="drop_fraction"):
            keep_channels(64, bad)


def test_saved_activations_shrink_with_keep():
    """Compile-only temp bytes of grad w.r.t. x: below dense, falling as keep falls (I = 512).

    One layer, and a 4-layer residual stack (scan) where saved activations dominate the peak.
    """
    d, i, layers = 64, 512, 4
    x = jax.ShapeDtypeStruct((2, 256, d), jnp.float32)

    def one_layer(mlp):
        w_in = jax.ShapeDtypeStruct((d, i), jnp.float32)
        w_out = jax.ShapeDtypeStruct((i, d), jnp.float32)
        grad = jax.jit(jax.grad(lambda x, *w: mlp(x, *w).sum()))
        return compiled_memory(grad, x, w_in, w_in, w_out).temp_bytes

    def stack(mlp):
        def loss(x, *w):
            def body(h, ws):
                return h + mlp(h, *ws), None
            return jax.lax.scan(body, x, w)[0].sum()

        w_in = jax.ShapeDtypeStruct((layers, d, i), jnp.float32)
        w_out = jax.ShapeDtypeStruct((layers, i, d), jnp.float32)
        return compiled_memory(jax.jit(jax.grad(loss)), x, w_in, w_in, w_out).temp_bytes

    def sparse(keep):
        return lambda x, *w: channel_sparse_swiglu(x, *w, keep)

    keeps = (512, 256, 102)
    single = {keep: one_layer(sparse(keep)) for keep in keeps}
    single_dense = one_layer(dense_mlp)
    assert single[256] < single_dense and single[102] < single_dense, (single, single_dense)
    assert single[512] > single[256] > single[102], single
    stacked = {keep: stack(sparse(keep)) for keep in keeps}
    stacked_dense = stack(dense_mlp)
    assert stacked_dense > stacked[512] > stacked[256] > stacked[102], (stacked, stacked_dense)
    # The dense MLP rematerialises silu(g)*u (saves g and u only), so the margin is ~2.8x, not 5x.
    assert stacked[102] < stacked_dense / 2.5, (stacked, stacked_dense)


def tiny_mlp(seed=0) -> tuple[Llama, MLP]:
    model = Llama(preset("tiny"), rngs=nnx.Rngs(seed))
    return model, model.layers[0].mlp


def test_sparse_backward_mlp_matches_module():
    _, mlp = tiny_mlp()
    d = mlp.gate_proj.kernel.shape[0]
    x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 8, d)), jnp.float32)

    np.testing.assert_allclose(sparse_backward_mlp(mlp, x, 16), mlp(x), rtol=0, atol=1e-6)
    ffn = mlp.gate_proj.kernel.shape[1]
    dense_dx = jax.jit(jax.grad(lambda x: mlp(x).sum()))(x)
    sparse_dx = jax.jit(jax.grad(lambda x: sparse_backward_mlp(mlp, x, ffn).sum()))(x)
    np.testing.assert_allclose(sparse_dx, dense_dx, rtol=1e-5, atol=1e-5)


def test_sparse_backward_mlp_refuses_adapters():
    model, _ = tiny_mlp()
    add_lora(model, LoRAConfig(targets=("gate",)), rngs=nnx.Rngs(1))
    x = jnp.zeros((1, 4, model.config.d_model), jnp.float32)
    with pytest.raises(ValueError, match="adapter"):
        sparse_backward_mlp(model.layers[0].mlp, x, 8)
    # Attention-only LoRA (LeMo's recipe) leaves the MLP usable.
    model2, mlp2 = tiny_mlp(2)
    add_lora(model2, LoRAConfig(), rngs=nnx.Rngs(3))
    assert sparse_backward_mlp(mlp2, x, 8).shape == x.shape


@pytest.mark.parametrize("rows", [5, 24, 4096])
def test_channel_ranking_accumulates_over_row_blocks(rows):
    """The blockwise fp32 ranking (24 tokens in blocks of 5: a padded last block) equals NumPy's."""
    from tokensparse.lemo.mlp import _rank_channels

    x, w_gate, w_up, _, _ = weights(seed=3)
    g, v = jnp.dot(x, w_gate), jnp.dot(x, w_up)
    got = jax.jit(_rank_channels, static_argnums=(2, 3))(g, v, 10, rows)
    np.testing.assert_array_equal(got, np_top_channels(x, w_gate, w_up, 10))


def test_recomputed_mlp_is_the_module_with_its_gradients():
    """Forward, dx and (with adapters on the MLP) adapter gradients equal the module's autodiff."""
    model, mlp = tiny_mlp(5)
    add_lora(model, LoRAConfig(targets=("gate", "up", "down")), rngs=nnx.Rngs(6))
    leaves, tree = jax.tree.flatten(nnx.state(mlp, nnx.Param))
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(mlp, jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))
    x = jnp.asarray(np.random.default_rng(8).standard_normal((2, 8, model.config.d_model)),
                    jnp.float32)
    cot = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape), jnp.float32)

    def grads(fn):
        return nnx.jit(nnx.grad(lambda m, x: jnp.sum(fn(m, x) * cot), argnums=(0, 1)))(mlp, x)

    np.testing.assert_allclose(recomputed_mlp(mlp, x), mlp(x), rtol=0, atol=1e-6)
    (w_ref, dx_ref), (w, dx) = grads(lambda m, x: m(x)), grads(recomputed_mlp)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(w_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(dx))) > 0
