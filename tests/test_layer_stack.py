"""Stacked layers and the one layer loop: scanned == unrolled (logits, LoRA gradients), whatever the
layer groups, for dense, mixed dense/sparse (LeMo) and remat runs; per-layer views and editing;
the HF round trip through the stacked layout."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import hf, lora, train
from tokensparse.config import LoRAConfig, preset
from tokensparse.layer_stack import LayerStack, runs
from tokensparse.lemo import forward as lemo_forward
from tokensparse.llama import Llama

CONFIG = preset("tiny").replace(n_layers=4)
B, T, BLOCK = 2, 64, 16
# Layers 1 and 2 sparse at keep 0.5 (one run), 0 and 3 dense: three runs.
MIXED = spec_lemo(block_size=BLOCK, schedule="profile", profile=(1.0, 0.5, 0.5, 1.0))


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def _batch(seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, CONFIG.vocab_size)
    return Batch(tokens, jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.zeros((B, T), jnp.int32))


def _model(remat="none", dropout=0.0):
    m = Llama(CONFIG, remat=remat, rngs=nnx.Rngs(0))
    m = lora.add_lora(m, LoRAConfig(dropout=dropout), rngs=nnx.Rngs(1))
    leaves, tree = jax.tree.flatten(lora.lora_state(m))
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(m, jax.tree.unflatten(tree, [0.05 * jax.random.normal(k, x.shape)
                                            for k, x in zip(keys, leaves, strict=True)]))
    return m


def _unrolled(model):
    twin = nnx.clone(model)
    twin.scan_layers = False
    return twin


def _loss_and_grads(loss_fn, model, batch):
    fn = nnx.value_and_grad(lambda m, b: loss_fn(m, b)[0], argnums=nnx.DiffState(0, lora.LoRAParam))
    return nnx.jit(fn)(model, batch)


def _values(x):
    return np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)


def _assert_same(a, b, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(_values(x), _values(y), atol=atol, rtol=1e-5)


def test_runs_are_maximal_and_ordered():
    assert runs([1, 1, 0.5, 0.5, 0.5, 1]) == [(0, 2), (2, 5), (5, 6)]
    assert runs(["a"]) == [(0, 1)]


@pytest.mark.parametrize("groups", [None, (1, 2, 1), (3, 1)])
def test_scanned_equals_unrolled_dense_logits_and_grads(groups):
    model = _model()
    if groups:
        model.layers.regroup(groups)
    batch = _batch()
    logits = nnx.jit(lambda m, t: m(t))
    np.testing.assert_allclose(logits(model, batch.tokens), logits(_unrolled(model), batch.tokens),
                               atol=1e-5)
    _assert_same(_loss_and_grads(train.lm_loss, model, batch),
                 _loss_and_grads(train.lm_loss, _unrolled(model), batch))


@pytest.mark.parametrize("regroup", [False, True])
@pytest.mark.parametrize("mlp_mode", ["channel_sparse_bwd", "recompute"])
def test_scanned_equals_unrolled_with_mixed_dense_and_sparse_layers(regroup, mlp_mode):
    lemo = MIXED.replace(mlp_mode=mlp_mode)
    model = _model()
    if regroup:
        lemo_forward.group_layers(model, lemo)
        assert model.layers.sizes == (1, 2, 1)
    batch = _batch(1)

    def loss(m, b):
        return lemo_forward.lemo_loss(m, b, lemo=lemo)

    got = _loss_and_grads(loss, model, batch)
    want = _loss_and_grads(loss, _unrolled(model), batch)
    _assert_same(got, want)
    # and the sparse layers really are sparse: the dense forward differs
    dense_loss, _ = _loss_and_grads(train.lm_loss, model, batch)
    assert abs(float(dense_loss) - float(got[0])) > 1e-4


def test_scanned_equals_unrolled_under_a_names_remat_policy():
    model = _model(remat="names")
    batch = _batch(2)
    _assert_same(_loss_and_grads(train.lm_loss, model, batch),
                 _loss_and_grads(train.lm_loss, _unrolled(model), batch))


def test_lora_dropout_draws_the_same_masks_scanned_or_unrolled():
    model = _model(dropout=0.5)
    twin = _unrolled(model)
    batch = _batch(3)
    for _ in range(2):  # the RNG streams advance identically step after step
        _assert_same(_loss_and_grads(train.lm_loss, model, batch),
                     _loss_and_grads(train.lm_loss, twin, batch))
    _assert_same(nnx.state(model, nnx.RngState), nnx.state(twin, nnx.RngState))


def test_regroup_keeps_every_parameter_and_the_function():
    model = _model()
    before = hf.per_layer_params(model)
    logits = nnx.jit(lambda m, t: m(t))(model, _batch().tokens)
    model.layers.regroup((2, 1, 1))
    assert model.layers.sizes == (2, 1, 1) and len(model.layers) == 4
    after = hf.per_layer_params(model)
    assert set(before) == set(after)
    for path in before:
        np.testing.assert_array_equal(np.asarray(before[path][...]), np.asarray(after[path][...]))
    np.testing.assert_allclose(nnx.jit(lambda m, t: m(t))(model, _batch().tokens), logits, atol=1e-6)


def test_per_layer_views_are_copies_and_editing_writes_back():
    model = _model()
    view = model.layers[2]
    view.attn.q_proj.kernel[...] = jnp.zeros_like(view.attn.q_proj.kernel[...])
    assert np.abs(np.asarray(model.layers[2].attn.q_proj.kernel[...])).max() > 0  # a copy
    with model.layers.editing() as layers:
        layers[2].attn.q_proj.kernel[...] = jnp.zeros_like(layers[2].attn.q_proj.kernel[...])
    assert np.abs(np.asarray(model.layers[2].attn.q_proj.kernel[...])).max() == 0
    assert np.abs(np.asarray(model.layers[1].attn.q_proj.kernel[...])).max() > 0
    assert [b.attn.q_proj.kernel.shape for b in model.layers] == [(64, 64)] * 4
    assert model.layers[-1].attn.q_proj.kernel.shape == (64, 64)
    with pytest.raises(IndexError):
        model.layers[4]


def test_stacked_parameters_carry_a_layers_axis():
    model = _model()
    kernel = model.layers.groups[0].attn.q_proj.kernel
    assert kernel.shape[0] == CONFIG.n_layers
    assert kernel.get_metadata()["logical_axes"] == ("layers", "embed", "heads")
    assert model.layers[0].attn.q_proj.kernel.get_metadata()["logical_axes"] == ("embed", "heads")


def test_layers_of_different_structure_refuse_to_stack():
    a, b = _model(), Llama(CONFIG, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="share one structure"):
        LayerStack([a.layers[0], b.layers[1]])
    with pytest.raises(ValueError, match="add up to 4"):
        b.layers.regroup((2, 1))


def test_run_layers_returns_per_layer_outputs_and_rejects_bad_ranges():
    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    tokens = _batch().tokens

    def layer_fn(block, h, layer, selection):
        return block(h, layer.positions, layer.segment_ids, selection), layer.index

    @nnx.jit
    def indices(m, t):
        h = m.embed(t)
        pos = jnp.broadcast_to(jnp.arange(T), t.shape)
        return m.run_layers(h, pos, layer_fn=layer_fn, start=1, stop=4)[1]

    assert [int(i) for i in indices(model, tokens)] == [1, 2, 3]
    with pytest.raises(ValueError, match="out of range"):
        model.run_layers(jnp.zeros((1, 4, CONFIG.d_model)), jnp.zeros((1, 4), jnp.int32), stop=5)


def test_hf_round_trip_through_the_stacked_layout(tmp_path):
    model = Llama(CONFIG, rngs=nnx.Rngs(3))
    model.layers.regroup((1, 3))
    hf.save_llama(model, CONFIG, tmp_path)
    loaded, config, _ = hf.load_llama(tmp_path)
    assert config == CONFIG and loaded.layers.sizes == (CONFIG.n_layers,)
    want = hf.per_layer_params(model)
    got = hf.per_layer_params(loaded)
    assert set(want) == set(got)
    for path in want:
        np.testing.assert_array_equal(np.asarray(want[path][...]), np.asarray(got[path][...]))
    tokens = _batch().tokens
    logits = nnx.jit(lambda m, t: m(t))
    np.testing.assert_allclose(logits(loaded, tokens), logits(model, tokens), atol=1e-6)


def test_set_context_rescales_rope_in_every_stacked_layer():
    from tokensparse.pipelines.base import set_context

    model = Llama(CONFIG, rngs=nnx.Rngs(0))
    model.layers.regroup((1, 3))
    tokens = _batch().tokens
    logits = nnx.jit(lambda m, t: m(t))
    before = logits(model, tokens)
    longer = CONFIG.with_context(4 * CONFIG.max_positions)
    assert longer.rope_scaling != CONFIG.rope_scaling
    set_context(model, longer)
    assert [b.attn.rope_scaling for b in model.layers] == [longer.rope_scaling] * CONFIG.n_layers
    assert not np.allclose(logits(model, tokens), before, atol=1e-4)
