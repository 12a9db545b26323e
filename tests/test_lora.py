"""LoRA: zero-initialised adapters are a no-op, only adapters train, merging preserves the function."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tokensparse import lora
from tokensparse.config import LoRAConfig, preset
from tokensparse.llama import Llama

TINY = preset("tiny")


def _tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (2, 16), 0, TINY.vocab_size)


def _logits(model, tokens):
    return nnx.jit(lambda m, t: m(t))(model, tokens)


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _base_params(model):
    return nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora.LoRAParam)))


def _randomise_adapters(model, seed=0):
    state = lora.lora_state(model)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        tree, [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)]))


def test_zero_initialised_adapters_leave_logits_unchanged():
    model = Llama(TINY, rngs=nnx.Rngs(0))
    tokens = _tokens()
    before = _logits(model, tokens)
    lora.add_lora(model, LoRAConfig(targets=("q", "k", "v", "o", "gate", "up", "down")),
                  rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(before, _logits(model, tokens))
    assert lora.has_lora(model)


def test_only_lora_parameters_get_gradients_and_change():
    model = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    base_before = jax.tree.map(np.asarray, _base_params(model))
    lora_before = jax.tree.map(np.asarray, lora.lora_state(model))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora.TRAINABLE)

    @nnx.jit
    def step(model, optimizer, tokens):
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, lora.TRAINABLE))(model, tokens)
        optimizer.update(model, grads)
        return grads

    grads = step(model, optimizer, _tokens())
    grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
    lora_paths = {path for path, _ in nnx.to_flat_state(lora.lora_state(model))}
    # Layers are stacked: one a and one b per target, each with a leading layer axis.
    assert grad_paths == lora_paths and len(lora_paths) == 4 * 2
    assert all(g.shape[0] == TINY.n_layers for _, g in nnx.to_flat_state(grads))
    # B starts at zero, so only B has a gradient on the first step (A's is exactly zero).
    for path, g in nnx.to_flat_state(grads):
        assert (np.abs(np.asarray(g[...])).max() > 0) == (path[-1] == "b"), path
    step(model, optimizer, _tokens(1))
    jax.tree.map(np.testing.assert_array_equal, base_before,
                 jax.tree.map(np.asarray, _base_params(model)))
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), lora_before,
                           jax.tree.map(np.asarray, lora.lora_state(model)))
    assert all(jax.tree.leaves(changed))


@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ("o", "gate", "down")])
def test_merge_preserves_logits_and_removes_adapters(targets):
    model = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), LoRAConfig(targets=targets),
                          rngs=nnx.Rngs(1))
    _randomise_adapters(model)
    tokens = _tokens()
    with_adapters = _logits(model, tokens)
    assert not np.allclose(with_adapters, _logits(Llama(TINY, rngs=nnx.Rngs(0)), tokens))
    lora.merge_lora(model)
    assert not lora.has_lora(model)
    assert not jax.tree.leaves(lora.lora_state(model))
    np.testing.assert_allclose(_logits(model, tokens), with_adapters, atol=1e-5)


def test_adapter_applies_scale_alpha_over_rank():
    config = LoRAConfig(rank=4, alpha=2.0, targets=("q",))
    model = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), config, rngs=nnx.Rngs(1))
    _randomise_adapters(model)
    adapter = model.layers[0].attn.q_proj.adapter
    x = jax.random.normal(jax.random.key(2), (3, TINY.d_model))
    expect = 0.5 * np.asarray(x) @ np.asarray(adapter.a[...]) @ np.asarray(adapter.b[...])
    np.testing.assert_allclose(adapter(x), expect, atol=1e-5)


def test_dropout_only_in_train_mode():
    model = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), LoRAConfig(dropout=0.5),
                          rngs=nnx.Rngs(1))
    _randomise_adapters(model)
    tokens = _tokens()
    model.eval()
    a, b = model(tokens), model(tokens)
    np.testing.assert_array_equal(a, b)
    model.train()
    assert not np.allclose(model(tokens), a)


def test_errors():
    model = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_lora(model, LoRAConfig(), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="unknown projections"):
        LoRAConfig(targets=("q", "qkv"))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_lora_params_are_float32_on_a_bf16_model():
    config = TINY.replace(dtype="bfloat16", param_dtype="bfloat16")
    model = lora.add_lora(Llama(config, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(lora.lora_state(model)))
    assert model(_tokens()).dtype == jnp.bfloat16


def _train_with(wrt, steps=3):
    """A LoRA model trained ``steps`` Adam steps, selecting the trained variables with ``wrt``."""
    model = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=wrt)

    @nnx.jit
    def step(model, optimizer, tokens):
        grads = nnx.grad(_loss, argnums=nnx.DiffState(0, wrt))(model, tokens)
        optimizer.update(model, grads)

    for i in range(steps):
        step(model, optimizer, _tokens(i))
    return model


def test_flax_lora_param_filter_trains_the_adapters():
    # Flax's own filter must select the project's adapters (a separate class would train nothing, silently).
    assert issubclass(lora.LoRAParam, nnx.LoRAParam) and issubclass(lora.LoRAParam, nnx.Param)
    fresh = lora.add_lora(Llama(TINY, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    flax_model = _train_with(nnx.LoRAParam)
    ours = _train_with(lora.LoRAParam)
    # Frozen weights are bit-for-bit unchanged; every adapter leaf moved.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, _base_params(fresh)),
                 jax.tree.map(np.asarray, _base_params(flax_model)))
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.tree.map(np.asarray, lora.lora_state(fresh)),
                         jax.tree.map(np.asarray, lora.lora_state(flax_model)))
    assert jax.tree.leaves(moved) and all(jax.tree.leaves(moved))
    # Same training whichever filter names the adapters.
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(ours)),
                 jax.tree.map(np.asarray, nnx.state(flax_model)))
