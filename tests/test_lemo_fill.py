"""LeMo's fill for eliminated blocks (``LeMoConfig.eliminated="sink_local"``): the compacted layer
equals a dense layer under an explicit mask (forward and VJP, input and LoRA), with block 0 kept or
eliminated, packed rows, and per-shard selections; the kept rows are untouched by it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora, routing
from tokensparse.config import LeMoConfig, LoRAConfig, preset
from tokensparse.lemo import fill
from tokensparse.lemo import forward as lemo_forward
from tokensparse.llama import Llama

CONFIG = preset("tiny").replace(n_layers=2)
B, T, BLOCK = 2, 128, 16
NB = T // BLOCK


@pytest.fixture(scope="module")
def block():
    m = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    leaves, tree = jax.tree.flatten(lora.lora_state(m))
    keys = jax.random.split(jax.random.key(7), len(leaves))
    nnx.update(m, jax.tree.unflatten(
        tree, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))
    return m.layers[1]


def _selection(kept_blocks: np.ndarray, shards: int = 1) -> routing.Selection:
    """The block selection keeping ``kept_blocks`` ([B, NB] bool, the same count per row)."""
    scores = jnp.where(jnp.asarray(kept_blocks), 1.0, 0.0)
    k = int(kept_blocks[0].sum())
    return routing.block_topk_select(scores, BLOCK, k, shards=shards)


def _kept(first_kept: bool, seed: int = 0, k: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kept = np.zeros((B, NB), bool)
    for r in range(B):
        pool = np.arange(1, NB)
        choice = rng.choice(pool, k - 1 if first_kept else k, replace=False)
        kept[r, choice] = True
        kept[r, 0] = first_kept
    return kept


CASES = {  # name: (kept blocks, segment ids, shards)
    "first_block_kept": (_kept(True), None, 1),
    "first_block_eliminated": (_kept(False, seed=1), None, 1),
    "packed_rows": (_kept(True, seed=2), np.repeat(np.array([[0] * 80 + [1] * 48]), B, 0), 1),
}


def _per_shard_case():
    kept = np.zeros((B, NB), bool)
    kept[:, [0, 2, 5, 6]] = True  # two per half
    return kept, None, 2


CASES["per_shard"] = _per_shard_case()


@pytest.mark.parametrize("case", sorted(CASES))
def test_compacted_fill_equals_the_masked_reference_forward_and_vjp(block, case):
    kept, seg, shards = CASES[case]
    sel = _selection(kept, shards)
    np.testing.assert_array_equal(np.asarray(fill.kept_blocks(sel, NB)), kept)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    seg = jnp.zeros((B, T), jnp.int32) if seg is None else jnp.asarray(seg, jnp.int32)
    if case == "packed_rows":  # positions restart with the second document
        pos = jnp.where(seg == 1, jnp.arange(T) - 80, pos)
    x = jax.random.normal(jax.random.key(3), (B, T, CONFIG.d_model))
    w = jax.random.normal(jax.random.key(4), x.shape)

    def compacted(b, x):
        return lemo_forward.lemo_block(b, x, pos, seg, sel, eliminated="sink_local")

    def masked(b, x):
        h = fill.reference(b, x, pos, jnp.asarray(kept), BLOCK, seg)
        return b.feed_forward(h)

    def grads(layer):
        loss = lambda b, x: jnp.sum(layer(b, x) * w)
        return nnx.jit(nnx.value_and_grad(loss, argnums=(nnx.DiffState(0, lora.LoRAParam), 1)))(
            block, x)

    (v_c, g_c), (v_m, g_m) = grads(compacted), grads(masked)
    np.testing.assert_allclose(nnx.jit(compacted)(block, x), nnx.jit(masked)(block, x), atol=2e-5)
    np.testing.assert_allclose(v_c, v_m, rtol=1e-5)
    leaves_c, leaves_m = jax.tree.leaves(g_c), jax.tree.leaves(g_m)
    assert len(leaves_c) == len(leaves_m) > 1
    for a, b in zip(leaves_c, leaves_m, strict=True):
        np.testing.assert_allclose(a, b, atol=5e-5)


def test_fill_touches_only_eliminated_rows_and_differs_from_pass(block):
    kept = _kept(True, seed=5)
    sel = _selection(kept)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = jax.random.normal(jax.random.key(6), (B, T, CONFIG.d_model))
    filled = np.asarray(nnx.jit(lambda b, x: fill.sink_local(b, x, pos, None, fill.eliminated_of(
        sel, NB)))(block, x))
    kept_t = np.repeat(kept, BLOCK, axis=1)
    np.testing.assert_array_equal(filled[kept_t], np.asarray(x)[kept_t])
    assert np.abs(filled[~kept_t] - np.asarray(x)[~kept_t]).min(axis=-1).max() > 0  # every row moved
    out = {mode: np.asarray(nnx.jit(lambda b, x, m=mode: lemo_forward.lemo_block(
        b, x, pos, None, sel, eliminated=m))(block, x)) for mode in ("pass", "sink_local")}
    assert np.abs(out["pass"] - out["sink_local"])[~kept_t].max() > 1e-3


def test_the_fill_is_causal(block):
    """Perturbing tokens after position t leaves the filled layer's outputs at <= t unchanged
    (with the selection fixed)."""
    kept = _kept(False, seed=8)
    sel = _selection(kept)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = jax.random.normal(jax.random.key(9), (B, T, CONFIG.d_model))
    run = nnx.jit(lambda b, x: lemo_forward.lemo_block(b, x, pos, None, sel, eliminated="sink_local"))
    cut = 40  # inside block 2
    future = x.at[:, cut + 1:].add(jax.random.normal(jax.random.key(10), (B, T - cut - 1,
                                                                           CONFIG.d_model)))
    a, b = np.asarray(run(block, x)), np.asarray(run(block, future))
    np.testing.assert_allclose(a[:, :cut + 1], b[:, :cut + 1], atol=1e-6)
    assert np.abs(a[:, cut + 1:] - b[:, cut + 1:]).max() > 1e-3


def test_default_config_fills_and_the_spec_config_passes():
    assert LeMoConfig().eliminated == "sink_local"
    assert spec_lemo().eliminated == "pass"
    with pytest.raises(ValueError, match=r"LeMoConfig.eliminated='zero' must be one of"):
        LeMoConfig(eliminated="zero")


def test_token_level_selections_are_refused_with_the_fill():
    sel = routing.topk_select(jnp.zeros((B, T)), 32)
    with pytest.raises(ValueError, match="needs a block selection"):
        fill.eliminated_of(sel, NB)


def test_fill_flops_equal_the_analytic_count():
    """Compiled matmul FLOPs of the fill's forward (XLA attention, so no masked tiles are counted)
    against a count by hand: q/k/v/o projections of the eliminated rows, the first block's k/v,
    and each eliminated block's 16 queries over 32 keys."""
    from tokensparse import flops
    from tokensparse.llama import DecoderBlock

    cfg = preset("tiny")
    b = DecoderBlock(cfg, layer=0, attention_backend="xla", rngs=nnx.Rngs(0))
    kept = np.zeros((B, NB), bool)
    kept[:, [0, 3, 5]] = True
    sel = _selection(kept)
    x = jnp.ones((B, T, cfg.d_model))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    run = nnx.jit(lambda b, x: fill.sink_local(b, x, pos, None, fill.eliminated_of(sel, NB)))
    got = flops.compiled_flops(run.lower(b, x).compile())
    e, d = NB - 3, cfg.d_model
    head_dim = d // cfg.n_heads
    rows, kv_width = B * e * BLOCK, cfg.n_kv_heads * head_dim
    want = (2 * rows * d * (d + 2 * kv_width)  # q, k, v of the eliminated rows
            + 2 * B * BLOCK * d * 2 * kv_width  # k, v of the first block
            + 2 * 2 * (B * e) * BLOCK * (2 * BLOCK) * cfg.n_heads * head_dim  # scores, values
            + 2 * rows * d * d)  # o_proj
    assert got == want


def test_a_selection_keeping_every_block_needs_no_fill(block):
    """A layer that keeps all its blocks (Algorithm 1's thresholds can) is the dense layer."""
    sel = _selection(np.ones((B, NB), bool))
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = jax.random.normal(jax.random.key(11), (B, T, CONFIG.d_model))
    run = nnx.jit(lambda b, x: lemo_forward.lemo_block(b, x, pos, None, sel, eliminated="sink_local"))
    np.testing.assert_allclose(run(block, x), nnx.jit(lambda b, x: b(x, pos))(block, x), atol=1e-5)
