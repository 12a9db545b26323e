"""The dense backbone: config validation, presets, masking semantics, routed attention sub-layer."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tokensparse import routing
from tokensparse.config import ModelConfig, RopeScaling, preset
from tokensparse.llama import Llama
from tokensparse.rope import apply_rope, inverse_frequencies

TINY = preset("tiny")
B, T = 2, 32


@pytest.fixture(scope="module")
def model():
    return Llama(TINY, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def forward():
    return nnx.jit(lambda m, tokens, positions, segments: m(tokens, positions, segments))


def _tokens(seed=0, shape=(B, T)):
    return jax.random.randint(jax.random.key(seed), shape, 0, TINY.vocab_size)


def _positions(shape=(B, T)):
    return jnp.broadcast_to(jnp.arange(shape[1], dtype=jnp.int32), shape)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("changes, words", [
    (dict(n_heads=6, n_kv_heads=4), "divisible by n_kv_heads"),
    (dict(d_model=0), "d_model"),
    (dict(head_dim=15), "even"),
    (dict(dtype="float64"), "dtype"),
    (dict(rms_eps=0.0), "rms_eps"),
])
def test_config_errors_name_the_field(changes, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(TINY, **changes)


def test_rope_scaling_errors():
    with pytest.raises(ValueError, match="yarn"):
        RopeScaling(kind="yarn")
    with pytest.raises(ValueError, match="factor"):
        RopeScaling(kind="linear", factor=0.5)


def test_config_round_trips_through_dict():
    config = TINY.replace(rope_scaling=RopeScaling.linear(4.0))
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Unknown ModelConfig keys"):
        ModelConfig.from_dict({**config.to_dict(), "n_experts": 8})


def test_with_context_uses_ceil_factor():
    config = preset("llama2-7b").with_context(10_000)
    assert config.rope_scaling == RopeScaling(kind="linear", factor=3.0)
    assert preset("llama2-7b").with_context(4096) == preset("llama2-7b")


@pytest.mark.parametrize("name, published", [
    ("llama2-7b", 6_738_415_616),  # Meta's Llama-2-7b-hf parameter count
    ("llama3-8b", 8_030_261_248),  # Meta-Llama-3-8B
])
def test_large_presets_match_published_parameter_counts(name, published):
    assert preset(name).num_params() == published


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_num_params_counts_the_real_model(name):
    abstract = nnx.eval_shape(lambda: Llama(preset(name), rngs=nnx.Rngs(0)))
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert counted == preset(name).num_params()
    if name == "small":
        assert 8e6 < counted < 12e6


def test_unknown_preset():
    with pytest.raises(ValueError, match="available"):
        preset("gpt5")


# ---------------------------------------------------------------- rope


def test_rope_matches_complex_rotation():
    """RoPE rotates pair (i, i + d/2) by angle pos * inv_freq[i]: check against complex numbers."""
    x = np.random.default_rng(0).normal(size=(1, 5, 2, 8)).astype(np.float32)
    pos = np.array([[0, 3, 7, 100, 4095]])
    inv = np.asarray(inverse_frequencies(8, 10000.0))
    np.testing.assert_allclose(inv, 10000.0 ** (-np.arange(0, 8, 2) / 8), rtol=1e-6)
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[..., None, None] * inv)
    expect = np.concatenate([z.real, z.imag], axis=-1)
    np.testing.assert_allclose(apply_rope(jnp.asarray(x), jnp.asarray(pos), jnp.asarray(inv)),
                               expect, atol=1e-4)


def test_linear_scaling_is_position_interpolation():
    x = jax.random.normal(jax.random.key(0), (1, 4, 1, 16))
    pos = jnp.array([[0, 2, 10, 20]])
    scaled = apply_rope(x, pos, inverse_frequencies(16, 1e4, RopeScaling.linear(2.0)))
    halved = apply_rope(x, pos // 2, inverse_frequencies(16, 1e4))
    np.testing.assert_allclose(scaled, halved, atol=1e-5)


def test_llama3_scaling_keeps_high_and_scales_low_frequencies():
    scaling = RopeScaling(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_positions=8192)
    base = np.asarray(inverse_frequencies(128, 500000.0))
    scaled = np.asarray(inverse_frequencies(128, 500000.0, scaling))
    wavelen = 2 * np.pi / base
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / 8, rtol=1e-6)
    mid = ~high & ~low
    assert np.all((scaled[mid] <= base[mid]) & (scaled[mid] >= base[mid] / 8))


# ---------------------------------------------------------------- model semantics


def test_forward_shapes_and_default_positions(model, forward):
    tokens = _tokens()
    logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert logits.shape == (B, T, TINY.vocab_size) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, forward(model, tokens, _positions(), None), atol=1e-6)


def test_causal(model, forward):
    tokens = _tokens()
    changed = tokens.at[:, 20].set((tokens[:, 20] + 1) % TINY.vocab_size)
    a, b = forward(model, tokens, _positions(), None), forward(model, changed, _positions(), None)
    np.testing.assert_array_equal(a[:, :20], b[:, :20])
    assert not np.allclose(a[:, 20:], b[:, 20:])


def test_packed_documents_do_not_attend_across(model, forward):
    tokens = _tokens()
    segments = jnp.where(jnp.arange(T) < 12, 0, 1)[None].repeat(B, 0)
    positions = jnp.where(jnp.arange(T) < 12, jnp.arange(T), jnp.arange(T) - 12)[None].repeat(B, 0)
    changed = tokens.at[:, :12].set((tokens[:, :12] + 7) % TINY.vocab_size)
    a = forward(model, tokens, positions, segments)
    b = forward(model, changed, positions, segments)
    np.testing.assert_array_equal(a[:, 12:], b[:, 12:])
    # The second document alone, from position 0, gives the same logits as inside the pack.
    alone = forward(model, tokens[:, 12:], _positions((B, T - 12)), None)
    np.testing.assert_allclose(a[:, 12:], alone, atol=1e-5)


def test_shifting_positions_changes_nothing(model, forward):
    tokens = _tokens()
    a = forward(model, tokens, _positions(), None)
    b = forward(model, tokens, _positions() + 37, None)
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_bf16_model_runs():
    config = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
    m = Llama(config, rngs=nnx.Rngs(0))
    logits = m(_tokens())
    assert logits.dtype == jnp.bfloat16
    assert m.layers[0].attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ref = Llama(TINY, rngs=nnx.Rngs(0))(_tokens())
    assert float(jnp.max(jnp.abs(logits.astype(jnp.float32) - ref))) < 0.1


def test_selections_length_is_checked(model):
    with pytest.raises(ValueError, match="2 layers"):
        model(_tokens(), selections=[None])


# ---------------------------------------------------------------- routed attention sub-layer


def _random_selection(seed, n=T, k=20, n_invalid=3):
    rng = np.random.default_rng(seed)
    idx = np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(B)])
    valid = np.ones((B, k), bool)
    valid[:, rng.choice(k, n_invalid, replace=False)] = False
    return routing.Selection(jnp.asarray(idx, jnp.int32), jnp.asarray(valid))


def test_all_tokens_selection_is_exactly_dense(model, forward):
    tokens = _tokens()
    sel = routing.all_tokens(B, T)
    dense = forward(model, tokens, _positions(), None)
    routed = nnx.jit(lambda m, t: m(t, selections=[sel, sel]))(model, tokens)
    np.testing.assert_array_equal(dense, routed)


def test_routed_attention_equals_dense_with_unselected_tokens_removed(model):
    """Compacted attention == dense attention where unselected tokens are neither queries nor keys."""
    block = model.layers[0]
    x = jax.random.normal(jax.random.key(3), (B, T, TINY.d_model))
    pos = _positions() * 3 + 5  # non-contiguous original positions
    seg = jnp.zeros((B, T), jnp.int32)
    sel = _random_selection(0)
    kept = np.zeros((B, T), bool)
    for b in range(B):
        kept[b, np.asarray(sel.indices[b])[np.asarray(sel.valid[b])]] = True
    masked_seg = jnp.where(kept, seg, -1)

    def routed(block, x):
        return block.attend(x, pos, seg, sel)

    def dense_masked(block, x):
        return block.attend(x, pos, masked_seg)

    w = jax.random.normal(jax.random.key(4), x.shape)

    def loss(fn):
        return lambda block, x: jnp.sum(fn(block, x) * w)

    out_r, out_d = nnx.jit(routed)(block, x), nnx.jit(dense_masked)(block, x)
    np.testing.assert_allclose(out_r, out_d, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out_r)[~kept], np.asarray(x)[~kept])  # pass-through
    gr = nnx.jit(nnx.grad(loss(routed), argnums=(0, 1)))(block, x)
    gd = nnx.jit(nnx.grad(loss(dense_masked), argnums=(0, 1)))(block, x)
    for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(gd), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_routed_attention_equals_running_on_the_kept_subsequence(model):
    """The kept tokens, run densely as their own sequence at original positions, give the same."""
    block = model.layers[1]
    x = jax.random.normal(jax.random.key(5), (B, T, TINY.d_model))
    pos = _positions()
    sel = _random_selection(1, n_invalid=0)
    out = nnx.jit(lambda b, x: b.attend(x, pos, None, sel))(block, x)
    xk, pk = routing.gather(x, sel), routing.gather(pos, sel)
    sub = nnx.jit(lambda b, x: b.attend(x, pk))(block, xk)
    np.testing.assert_allclose(routing.gather(out, sel), sub, atol=1e-5)
