"""LeMo's per-layer elimination: dense equivalence, compacted == masked, pass-through, schedule,
memory, and input validation."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora, routing, train
from tokensparse.config import LeMoConfig, LoRAConfig, preset
from tokensparse.lemo import forward as lemo_forward
from tokensparse.lemo import selection as lemo_selection
from tokensparse.lemo.scoring import ScoreOptions
from tokensparse.llama import Llama
from tokensparse.metrics import compiled_memory

CONFIG = preset("tiny").replace(n_layers=4)
B, T, BLOCK = 2, 128, 16


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def _batch(seed=0, t=T):
    tokens = jax.random.randint(jax.random.key(seed), (B, t), 0, CONFIG.vocab_size)
    return Batch(tokens, jnp.broadcast_to(jnp.arange(t), (B, t)), jnp.zeros((B, t), jnp.int32))


def _randomise_adapters(model, seed=0):
    leaves, tree = jax.tree.flatten(lora.lora_state(model))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))


@pytest.fixture(scope="module")
def model():
    m = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    _randomise_adapters(m)
    return m


def _loss_and_lora_grads(loss_fn, model, batch):
    fn = nnx.value_and_grad(lambda m, b: loss_fn(m, b)[0],
                            argnums=nnx.DiffState(0, lora.LoRAParam))
    return nnx.jit(fn)(model, batch)


@pytest.mark.parametrize("lemo", [
    spec_lemo(block_size=BLOCK, keep_ratio=1.0, schedule="all", mlp_mode="dense"),
    spec_lemo(block_size=BLOCK, keep_ratio=1.0, schedule="all", mlp_drop=0.0),
])
def test_keep_everything_equals_dense_lora(model, lemo):
    batch = _batch()
    loss_d, g_d = _loss_and_lora_grads(train.lm_loss, model, batch)
    loss_l, g_l = _loss_and_lora_grads(
        lambda m, b: lemo_forward.lemo_loss(m, b, lemo=lemo), model, batch)
    np.testing.assert_allclose(loss_l, loss_d, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_l), jax.tree.leaves(g_d), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _lemo_grads(model, batch, **lemo):
    return _loss_and_lora_grads(lambda m, b: lemo_forward.lemo_loss(m, b, lemo=spec_lemo(**lemo)),
                                model, batch)


def test_recomputed_mlp_equals_the_dense_mlp_under_elimination(model):
    """``mlp_mode="recompute"`` changes what the backward saves, not what it computes: with blocks
    eliminated its loss and LoRA gradients are the dense MLP's; the channel-sparse backward's are not."""
    batch = _batch()
    common = {"block_size": BLOCK, "keep_ratio": 0.5, "schedule": "all"}
    loss_d, g_d = _lemo_grads(model, batch, mlp_mode="dense", **common)
    loss_r, g_r = _lemo_grads(model, batch, mlp_mode="recompute", **common)
    _, g_c = _lemo_grads(model, batch, mlp_mode="channel_sparse_bwd", mlp_drop=0.8, **common)
    np.testing.assert_allclose(loss_r, loss_d, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_d), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    worst = max(float(jnp.max(jnp.abs(a - b)))
                for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_d), strict=True))
    assert worst > 1e-4, worst


def test_recomputed_mlp_trains_mlp_adapters():
    """LoRA on the MLP: the channel-sparse backward refuses it (no weight gradients); the recomputed
    MLP gives every adapter, the MLP's included, the dense MLP's gradient."""
    targets = ("q", "k", "v", "o", "gate", "up", "down")
    m = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(targets=targets), rngs=nnx.Rngs(1))
    _randomise_adapters(m, seed=4)
    with pytest.raises(ValueError, match="LoRA on its MLP"):
        lemo_forward.check_lemo(m, spec_lemo(block_size=BLOCK), T)
    batch = _batch(1)
    common = {"block_size": BLOCK, "keep_ratio": 0.5, "schedule": "all"}
    _, g_d = _lemo_grads(m, batch, mlp_mode="dense", **common)
    _, g_r = _lemo_grads(m, batch, mlp_mode="recompute", **common)
    mlp_grads = [x for path, x in jax.tree.leaves_with_path(g_r)
                 if "mlp" in jax.tree_util.keystr(path)]
    # a and b of gate, up, down in every layer (stacked: one leaf each, a leading layer axis)
    assert sum(x.shape[0] for x in mlp_grads) == 2 * 3 * CONFIG.n_layers
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in mlp_grads)
    for a, b in zip(jax.tree.leaves(g_r), jax.tree.leaves(g_d), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _kept_mask(sel):
    kept = np.zeros((B, T), bool)
    for r in range(B):
        kept[r, np.asarray(sel.indices[r])[np.asarray(sel.valid[r])]] = True
    return kept


def test_sparse_layer_equals_masked_dense_layer_and_passes_eliminated_tokens(model):
    lemo = spec_lemo(block_size=BLOCK, keep_ratio=0.4, schedule="all", mlp_mode="dense")
    block = model.layers[1]
    x = jax.random.normal(jax.random.key(2), (B, T, CONFIG.d_model))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.zeros((B, T), jnp.int32)
    sel = nnx.jit(lambda b, x: lemo_selection.layer_selection(b, b.input_norm(x), 0.4, lemo))(block, x)
    kept = _kept_mask(sel)
    assert kept.sum(1).tolist() == [int(0.4 * T / BLOCK) * BLOCK] * B
    run = nnx.jit(lambda b, x: lemo_forward.lemo_block(b, x, pos, seg, sel))
    masked = nnx.jit(lambda b, x: b.feed_forward(b.attend(x, pos, jnp.where(kept, seg, -1))))
    np.testing.assert_allclose(run(block, x), masked(block, x), atol=1e-5)
    after_attention = nnx.jit(lambda b, x: b.attend(x, pos, seg, sel))(block, x)
    np.testing.assert_array_equal(np.asarray(after_attention)[~kept], np.asarray(x)[~kept])


def test_eliminated_tokens_do_not_leak_into_lora_gradients(model):
    block = model.layers[2]
    lemo = spec_lemo(block_size=BLOCK, keep_ratio=0.4, schedule="all")
    x = jax.random.normal(jax.random.key(3), (B, T, CONFIG.d_model))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    sel = nnx.jit(lambda b, x: lemo_selection.layer_selection(b, b.input_norm(x), 0.4, lemo))(block, x)
    dropped = np.flatnonzero(~_kept_mask(sel)[0])
    w = jax.random.normal(jax.random.key(4), x.shape)

    @nnx.jit
    def grads(block, x):
        loss = lambda b, x: jnp.sum(b.attend(x, pos, None, sel) * w)
        return nnx.grad(loss, argnums=nnx.DiffState(0, lora.LoRAParam))(block, x)

    perturbed = x.at[0, dropped].add(10.0)
    for a, b in zip(jax.tree.leaves(grads(block, x)), jax.tree.leaves(grads(block, perturbed)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_selection_is_top_blocks_of_the_oracle_scores(model):
    block = model.layers[1]
    lemo = spec_lemo(block_size=BLOCK, keep_ratio=0.4, schedule="all")
    x = jax.random.normal(jax.random.key(5), (B, T, CONFIG.d_model))
    u = block.input_norm(x)
    scores = np.asarray(lemo_selection.oracle_block_scores(block, u, ScoreOptions(block_size=BLOCK)))
    sel = lemo_selection.layer_selection(block, u, 0.4, lemo)
    k = int(0.4 * T // BLOCK)
    for r in range(B):
        blocks = np.unique(np.asarray(sel.indices[r]) // BLOCK)
        assert sorted(blocks) == sorted(np.argsort(-scores[r], kind="stable")[:k])
        assert np.all(np.diff(np.asarray(sel.indices[r])) > 0)


def test_half_schedule_matches_the_artifact():
    ratios = spec_lemo().keep_ratios(32)
    assert [i for i, r in enumerate(ratios) if r < 1] == list(range(15, 31))
    assert set(ratios) == {0.4, 1.0}
    assert routing.capacity(8192 // 64, 0.4, rounding="floor") == 51


def test_activation_memory_falls_with_keep_ratio_and_mlp_drop():
    config = CONFIG.replace(n_layers=2, ffn_dim=512)
    m = lora.add_lora(Llama(config, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    batch = _batch(t=512)

    def temp(**kw):
        lemo = spec_lemo(block_size=64, schedule="all", **kw)
        fn = nnx.jit(nnx.grad(lambda m, b: lemo_forward.lemo_loss(m, b, lemo=lemo)[0],
                              argnums=nnx.DiffState(0, lora.LoRAParam)))
        return compiled_memory(fn, m, batch).temp_bytes

    by_ratio = [temp(keep_ratio=r, mlp_mode="dense") for r in (1.0, 0.5, 0.25)]
    assert by_ratio[0] > by_ratio[1] > by_ratio[2], by_ratio
    # Dropping MLP channels from the backward saves memory (the exact ordering between drop
    # fractions depends on XLA's schedule at this tiny size, so only dense-vs-sparse is asserted).
    dense_mlp, sparse_mlp = temp(keep_ratio=0.25, mlp_drop=0.0), temp(keep_ratio=0.25, mlp_drop=0.8)
    assert sparse_mlp < dense_mlp, (dense_mlp, sparse_mlp)
    # So does recomputing the MLP from its input (D values per token instead of g and v's 2·I).
    recomputed = temp(keep_ratio=0.25, mlp_mode="recompute")
    assert recomputed < dense_mlp, (dense_mlp, recomputed)


def test_bad_inputs(model):
    with pytest.raises(ValueError, match="multiple of the block size"):
        lemo_forward.check_lemo(model, spec_lemo(block_size=64), 100)
    with pytest.raises(ValueError, match="keep_ratio"):
        spec_lemo(keep_ratio=0.0)
    with pytest.raises(ValueError, match="keep_ratio"):
        spec_lemo(keep_ratio=1.5)
    with pytest.raises(ValueError, match="3 entries"):
        spec_lemo(schedule="profile", profile=(1.0, 0.5, 0.5)).keep_ratios(4)
    with pytest.raises(ValueError, match="add_lora"):
        lemo_forward.check_lemo(Llama(CONFIG, rngs=nnx.Rngs(0)), spec_lemo(block_size=BLOCK), T)


def test_sparse_forward_loss_needs_no_adapters_and_matches_the_lemo_loss():
    """No training: keep 1 is the dense loss; keep 0.4 equals LeMo's loss with zero LoRA (B = 0) and
    costs loss; a model without adapters gives the same."""
    import tokensparse.lemo as lemo_api

    plain = Llama(CONFIG, rngs=nnx.Rngs(0))
    adapted = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    batch = _batch(4)
    loss = nnx.jit(lambda m, t, lemo: lemo_api.sparse_forward_loss(m, t, lemo), static_argnums=2)
    dense = spec_lemo(block_size=BLOCK, keep_ratio=1.0, schedule="all")
    sparse = spec_lemo(block_size=BLOCK, keep_ratio=0.4, schedule="all")
    dense_loss = float(nnx.jit(lambda m, b: train.lm_loss(m, b)[0])(plain, batch))
    np.testing.assert_allclose(float(loss(plain, batch.tokens, dense)), dense_loss, rtol=1e-6)
    got = float(loss(plain, batch.tokens, sparse))
    want = float(nnx.jit(lambda m, b: lemo_forward.lemo_loss(m, b, lemo=sparse)[0])(adapted, batch))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(float(loss(adapted, batch.tokens, sparse)), got, rtol=1e-5)
    assert abs(got - dense_loss) > 1e-3
    with pytest.raises(ValueError, match="multiple of the block"):
        lemo_api.sparse_forward_loss(plain, batch.tokens[:, :T - 1], sparse)


# ------------------------------------------ causality, compacted == masked VJP, dense equivalence


def _fixed_selections(seed, ratios, t=T):
    """One random block selection per sparse layer (None for dense layers)."""
    nb, out = t // BLOCK, []
    for i, r in enumerate(ratios):
        if r >= 1.0:
            out.append(None)
            continue
        scores = jax.random.uniform(jax.random.key(seed + i), (B, nb))
        out.append(routing.block_topk_select(scores, BLOCK, routing.capacity(nb, r, rounding="floor")))
    return out


def test_lemo_is_causal_with_a_frozen_selection(model):
    """With the blocks fixed, perturbing tokens after t leaves every output at positions <= t
    unchanged: elimination removes keys and queries, it never lets a token see the future."""
    lemo = spec_lemo(block_size=BLOCK, keep_ratio=0.5, schedule="all", mlp_mode="dense")
    sels = _fixed_selections(0, lemo.keep_ratios(CONFIG.n_layers))
    hidden = nnx.jit(lambda m, t: lemo_forward.lemo_hidden_states(m, t, lemo=lemo, selections=sels))
    tokens = _batch(5).tokens
    cut = 70  # inside a block: the rest of that block is the future too
    future = jax.random.randint(jax.random.key(9), (B, T - cut - 1), 0, CONFIG.vocab_size)
    perturbed = tokens.at[:, cut + 1:].set(future)
    a, b = np.asarray(hidden(model, tokens)), np.asarray(hidden(model, perturbed))
    np.testing.assert_allclose(a[:, :cut + 1], b[:, :cut + 1], atol=1e-6)
    assert np.max(np.abs(a[:, cut + 1:] - b[:, cut + 1:])) > 1e-3


def test_selection_itself_is_not_causal(model):
    """Documentation: the selection is made from the whole sequence (the oracle's column scores sum
    over every query block, the future included, and top-k ranks early blocks against late ones), so
    with the selector in the loop the future can change which early blocks a layer keeps, and so
    outputs before it. LeMo is a training method; it is not meant for autoregressive decoding."""
    lemo = spec_lemo(block_size=BLOCK, keep_ratio=0.5, schedule="all", mlp_mode="dense")
    block = model.layers[1]
    x = jax.random.normal(jax.random.key(6), (B, T, CONFIG.d_model))
    cut = 4 * BLOCK
    scores = nnx.jit(lambda b, x: lemo_selection.oracle_block_scores(
        b, b.input_norm(x), ScoreOptions(block_size=BLOCK)))
    before = np.asarray(scores(block, x))
    after = np.asarray(scores(block, x.at[:, cut:].add(3.0)))
    assert np.max(np.abs(before[:, :cut // BLOCK] - after[:, :cut // BLOCK])) > 1e-4
    hidden = nnx.jit(lambda m, t: lemo_forward.lemo_hidden_states(m, t, lemo=lemo))
    tokens = _batch(7).tokens
    base = np.asarray(hidden(model, tokens))
    changed = []
    for seed in range(4):
        future = jax.random.randint(jax.random.key(100 + seed), (B, T - cut), 0, CONFIG.vocab_size)
        out = np.asarray(hidden(model, tokens.at[:, cut:].set(future)))
        changed.append(float(np.max(np.abs(out[:, :cut] - base[:, :cut]))))
    assert max(changed) > 1e-4, changed


def test_sparse_layer_vjp_equals_the_masked_dense_layer(model):
    """Compacted == masked reference for the VJP: the gathered/scattered layer's gradients (input
    and LoRA) equal those of the dense layer with attention masked to kept tokens."""
    lemo = spec_lemo(block_size=BLOCK, keep_ratio=0.4, schedule="all", mlp_mode="dense")
    block = model.layers[1]
    x = jax.random.normal(jax.random.key(12), (B, T, CONFIG.d_model))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.zeros((B, T), jnp.int32)
    sel = nnx.jit(lambda b, x: lemo_selection.layer_selection(b, b.input_norm(x), 0.4, lemo))(block, x)
    kept = _kept_mask(sel)
    w = jax.random.normal(jax.random.key(13), x.shape)

    def grads(layer):
        loss = lambda b, x: jnp.sum(layer(b, x) * w)
        return nnx.jit(nnx.grad(loss, argnums=(nnx.DiffState(0, lora.LoRAParam), 1)))(block, x)

    g_sparse = grads(lambda b, x: lemo_forward.lemo_block(b, x, pos, seg, sel))
    g_masked = grads(lambda b, x: b.feed_forward(b.attend(x, pos, jnp.where(kept, seg, -1))))
    leaves_s, leaves_m = jax.tree.leaves(g_sparse), jax.tree.leaves(g_masked)
    assert len(leaves_s) == len(leaves_m) > 1
    for a, b in zip(leaves_s, leaves_m, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_keep_first_block_keeps_block_zero_in_every_sparse_layer(model):
    """The ``recent`` rule ranks block 0 last; ``keep_first_block`` forces it in anyway."""
    ratios = (1.0, 0.5, 1.0, 1.0)  # one sparse layer: it runs inline, its selection concrete
    base = LeMoConfig(block_size=BLOCK, schedule="profile", profile=ratios, selector="recent")
    for first in (False, True):
        lemo = base.replace(keep_first_block=first)
        seen = []

        def layer_fn(block, h, layer, selection, seen=seen):
            if selection is not None:
                seen.append(selection.indices)
            return lemo_forward.lemo_block(block, h, layer.positions, layer.segment_ids,
                                           selection, mlp_mode="dense"), None

        model.hidden_states(_batch().tokens, layer_fn=layer_fn,
                            router=lemo_selection.lemo_router(model, lemo),
                            kinds=lemo_forward.lemo_kinds(model, lemo, ratios))
        blocks = [np.unique(np.asarray(ix) // BLOCK) for ix in seen]
        assert blocks, "no sparse layer ran"
        nb = T // BLOCK
        for b in blocks:
            want = [0, *range(nb // 2 + 1, nb)] if first else list(range(nb // 2, nb))
            assert b.tolist() == want


def test_dense_equivalence_through_the_channel_sparse_vjp(model):
    """Keep 1.0 everywhere with the MLP forced through the channel-sparse custom VJP keeping all
    channels (LeMo's own routing sends keep = I to the plain MLP): loss and LoRA gradients equal
    the dense LoRA model's, so the custom VJP itself is exact at keep = I."""
    from tokensparse.lemo.mlp import sparse_backward_mlp

    ffn = CONFIG.ffn_dim
    calls = []

    def layer_fn(block, h, layer, selection):
        calls.append(1)
        h, normed = block.attend_and_norm(h, layer.positions, layer.segment_ids, selection)
        return block.feed_forward(h, normed, lambda x: sparse_backward_mlp(block.mlp, x, ffn)), None

    def lemo_like(m, b):
        return train.lm_loss(m, b, hidden_fn=lambda m, t, p, s: m.hidden_states(
            t, p, s, layer_fn=layer_fn))

    batch = _batch(3)
    loss_d, g_d = _loss_and_lora_grads(train.lm_loss, model, batch)
    loss_c, g_c = _loss_and_lora_grads(lemo_like, model, batch)
    assert calls
    np.testing.assert_allclose(loss_c, loss_d, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_c), jax.tree.leaves(g_d), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_mlp_drop_profile_sets_each_layers_mlp_backward(model):
    batch = _batch(2)
    common = {"block_size": BLOCK, "keep_ratio": 0.5, "schedule": "all"}
    _, g_scalar = _lemo_grads(model, batch, mlp_drop=0.5, **common)
    _, g_profile = _lemo_grads(model, batch, mlp_drop_profile=(0.5,) * CONFIG.n_layers, **common)
    for a, b in zip(jax.tree.leaves(g_profile), jax.tree.leaves(g_scalar), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    lemo = spec_lemo(mlp_drop_profile=(0.0, 0.5, 0.8, 0.5), **common)
    kinds = lemo_forward.lemo_kinds(model, lemo, lemo.keep_ratios(CONFIG.n_layers))
    ffn = CONFIG.ffn_dim
    assert [k.mlp_keep for k in kinds] == [ffn, ffn // 2, int(ffn * 0.2), ffn // 2]
    _, g_mixed = _lemo_grads(model, batch, mlp_drop_profile=(0.0, 0.5, 0.8, 0.5), **common)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(g_mixed), jax.tree.leaves(g_scalar), strict=True)) > 1e-6
    with pytest.raises(ValueError, match="mlp_drop_profile has 2 entries"):
        lemo_forward.check_lemo(model, spec_lemo(mlp_drop_profile=(0.5, 0.5), **common), T)
    with pytest.raises(ValueError, match="outside"):
        spec_lemo(mlp_drop_profile=(1.0,))
