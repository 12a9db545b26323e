"""Block-granular movement: whole-block gather / scatter-add with sorted-unique
index hints, and the sparse attention sub-layer's in-place add with backward input recovery.

Every fast path is checked against the token-level path (row-wise gather / scatter-add, which
tests/test_routing.py checks against NumPy) and against NumPy directly, forward and gradient, with
padding blocks in invalid slots and with per-shard selections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora, routing
from tokensparse.config import LoRAConfig, preset
from tokensparse.data.batching import Batch
from tokensparse.flops import compiled_flops
from tokensparse.lemo import forward as lemo_forward
from tokensparse.lemo import scoring
from tokensparse.llama import Llama, input_recovery
from tokensparse.remat import tagging

CONFIG = preset("tiny").replace(n_layers=3)
B, T, BLOCK = 2, 64, 8
NB = T // BLOCK


def _block_selection(seed, k_blocks, shards=1, n_valid=(NB, 2)):
    """Top-k blocks of random scores; row r has only its first ``n_valid[r]`` blocks valid, so a
    capacity above that fills slots with (invalid) padding blocks."""
    scores = jax.random.normal(jax.random.key(seed), (B, NB))
    valid = jnp.arange(NB)[None, :] < jnp.asarray(n_valid)[:, None]
    return routing.block_topk_select(scores, BLOCK, k_blocks, valid, shards=shards)


CASES = [dict(k_blocks=3), dict(k_blocks=5), dict(k_blocks=4, shards=2), dict(k_blocks=6, shards=4)]


def _np_gather(x, idx):
    return np.stack([x[r, idx[r]] for r in range(x.shape[0])])


def _np_scatter_add(base, idx, valid, values):
    out = base.copy()
    for r in range(base.shape[0]):
        for j in np.flatnonzero(valid[r]):
            out[r, idx[r, j]] += values[r, j]
    return out


@pytest.mark.parametrize("case", CASES)
def test_block_selection_is_whole_ascending_blocks(case):
    sel = _block_selection(0, **case)
    assert sel.block_size == BLOCK and sel.shards == case.get("shards", 1)
    idx, valid = np.asarray(sel.indices), np.asarray(sel.valid)
    blocks, block_valid = (np.asarray(a) for a in sel.blocks)
    np.testing.assert_array_equal(idx, (blocks[..., None] * BLOCK + np.arange(BLOCK)).reshape(B, -1))
    np.testing.assert_array_equal(valid, np.repeat(block_valid, BLOCK, axis=1))
    assert (np.diff(blocks, axis=1) > 0).all()  # distinct and ascending, padding blocks included
    assert not block_valid[1].all()  # the invalid-slot case is exercised
    tokens = sel.tokens()
    assert tokens.block_size == 1 and tokens.shards == sel.shards
    np.testing.assert_array_equal(tokens.indices, idx)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fill", [None, -7.0])
def test_block_gather_equals_token_gather_and_numpy(case, fill):
    sel = _block_selection(1, **case)
    x = jax.random.normal(jax.random.key(2), (B, T, 5))
    gather = jax.jit(routing.gather, static_argnames="fill_value")
    got = np.asarray(gather(x, sel, fill_value=fill))
    np.testing.assert_array_equal(got, gather(x, sel.tokens(), fill_value=fill))
    want = _np_gather(np.asarray(x), np.asarray(sel.indices))
    if fill is not None:
        want = np.where(np.asarray(sel.valid)[..., None], want, fill)
    np.testing.assert_array_equal(got, want)
    # Positions [B, T] (no feature axis) route the same way.
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    np.testing.assert_array_equal(routing.gather(pos, sel), sel.indices)


@pytest.mark.parametrize("case", CASES)
def test_block_scatter_add_equals_token_scatter_add_and_numpy(case):
    sel = _block_selection(3, **case)
    base = jax.random.normal(jax.random.key(4), (B, T, 5))
    values = jax.random.normal(jax.random.key(5), (B, sel.capacity, 5)) + 100.0
    got = np.asarray(jax.jit(routing.scatter_add)(base, sel, values))
    np.testing.assert_array_equal(got, routing.scatter_add(base, sel.tokens(), values))
    want = _np_scatter_add(np.asarray(base), np.asarray(sel.indices), np.asarray(sel.valid),
                           np.asarray(values))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    kept = np.zeros((B, T), bool)
    for r in range(B):
        kept[r, np.asarray(sel.indices)[r][np.asarray(sel.valid)[r]]] = True
    np.testing.assert_array_equal(got[~kept], np.asarray(base)[~kept])  # padding blocks unchanged


@pytest.mark.parametrize("case", CASES)
def test_block_routing_gradients_equal_the_token_path(case):
    sel = _block_selection(6, **case)
    x = jax.random.normal(jax.random.key(7), (B, T, 5))
    values = jax.random.normal(jax.random.key(8), (B, sel.capacity, 5))
    w_out = jax.random.normal(jax.random.key(9), (B, T, 5))
    w_rows = jax.random.normal(jax.random.key(10), (B, sel.capacity, 5))

    def loss(x, values, sel):
        rows = routing.gather(x, sel, fill_value=0.0)
        return (jnp.sum(routing.scatter_add(x, sel, values * rows) * w_out)
                + jnp.sum(jnp.tanh(rows) * w_rows))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    for got, want in zip(grad(x, values, sel), grad(x, values, sel.tokens()), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Invalid slots neither read (fill) nor write: their value gradient is zero.
    dvalues = np.asarray(grad(x, values, sel)[1])
    assert not np.asarray(sel.valid).all()
    np.testing.assert_array_equal(dvalues[~np.asarray(sel.valid)], 0.0)


def test_block_routing_carries_sorted_unique_hints_and_token_routing_does_not():
    sel = _block_selection(11, 4)
    x = jnp.ones((B, T, 5))

    def step(x, sel):
        return routing.scatter_add(x, sel, routing.gather(x, sel) * 2.0)

    block_hlo = jax.jit(step).lower(x, sel).as_text()
    token_hlo = jax.jit(step).lower(x, sel.tokens()).as_text()
    assert block_hlo.count("indices_are_sorted = true") >= 2
    assert block_hlo.count("unique_indices = true") >= 1
    assert token_hlo.count("indices_are_sorted = true") == 0


def test_select_blocks_keeps_whole_blocks_unless_the_tail_is_cut():
    scores = jnp.array([[1.0, 2.0, 3.0]])
    assert scoring.select_blocks(scores, 0.7, 4).block_size == 4
    cut = scoring.select_blocks(scores, 0.7, 4, seq_len=10)  # a partial block: token validity
    assert cut.block_size == 1
    np.testing.assert_array_equal(cut.valid, [[True] * 6 + [False] * 2])


def test_expand_blocks_rejects_a_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        routing.expand_blocks(routing.Selection(jnp.zeros((1, 2), jnp.int32),
                                                jnp.ones((1, 2), bool)), 0)


# ------------------------------------------------------------------ in-place add + input recovery


@pytest.fixture(scope="module")
def model():
    m = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
    leaves, tree = jax.tree.flatten(lora.lora_state(m))
    keys = jax.random.split(jax.random.key(0), len(leaves))
    nnx.update(m, jax.tree.unflatten(  # LoRA B = 0 would zero every A gradient: randomise both
        tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))
    return m


def _sublayer_vjp(block, x, sel, recovery, use_normed=True):
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    w_h = jax.random.normal(jax.random.key(20), x.shape)
    w_n = jax.random.normal(jax.random.key(21), x.shape)

    def loss(b, x):
        h, normed = b.attend_and_norm(x, pos, None, sel)
        return jnp.sum(h * w_h) + (jnp.sum(normed * w_n) if use_normed else 0.0)

    with input_recovery(recovery), tagging(False):
        fn = nnx.jit(nnx.value_and_grad(loss, argnums=(nnx.DiffState(0, lora.LoRAParam), 1)))
        return fn(block, x)


@pytest.mark.parametrize("case, use_normed", [(dict(k_blocks=3), True), (dict(k_blocks=5), False),
                                               (dict(k_blocks=4, shards=2), True)])
def test_input_recovery_vjp_equals_the_plain_vjp(model, case, use_normed):
    block = model.layers[1]
    x = 3.0 * jax.random.normal(jax.random.key(22), (B, T, CONFIG.d_model))
    sel = _block_selection(23, **case)
    loss_t, (g_lora_t, dx_t) = _sublayer_vjp(block, x, sel.tokens(), False, use_normed)
    loss_b, (g_lora_b, dx_b) = _sublayer_vjp(block, x, sel, False, use_normed)
    loss_r, (g_lora_r, dx_r) = _sublayer_vjp(block, x, sel, True, use_normed)
    np.testing.assert_array_equal(loss_b, loss_t)
    np.testing.assert_allclose(loss_r, loss_t, rtol=1e-6)
    leaves_t, leaves_b, leaves_r = (jax.tree.leaves(g) for g in (g_lora_t, g_lora_b, g_lora_r))
    assert len(leaves_t) == 8 and all(np.abs(g).max() > 0 for g in leaves_t)
    for t, b, r in zip(leaves_t, leaves_b, leaves_r, strict=True):
        np.testing.assert_allclose(b, t, rtol=1e-6, atol=1e-6)
        # x_k = (x + a) - a carries float32 rounding of h: agreement to that level, not bits.
        np.testing.assert_allclose(r, t, rtol=1e-4, atol=1e-5 * np.abs(t).max())
    np.testing.assert_allclose(dx_b, dx_t, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx_r, dx_t, rtol=1e-4, atol=1e-5 * np.abs(dx_t).max())


def test_input_recovery_is_used_and_keeps_flops(model):
    """The recovering sub-layer is what runs (its program differs: no copy of x for the scatter)
    and it does no extra matmul work: only perturbed parameters are differentiated."""
    block = model.layers[1]
    x = jax.ShapeDtypeStruct((B, T, CONFIG.d_model), jnp.float32)
    sel = _block_selection(24, 3)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    graphdef, lora_state, rest = nnx.split(block, lora.LoRAParam, ...)

    def step(lora_state, rest, x):
        def fwd(lora_state, x):
            return nnx.merge(graphdef, lora_state, rest).attend_and_norm(x, pos, None, sel)
        out, vjp = jax.vjp(fwd, lora_state, x)
        return vjp(out)

    compiled = {}
    for rec in (False, True):
        with input_recovery(rec), tagging(False):  # a fresh function: jit caches traces by function
            fresh = lambda *args: step(*args)  # noqa: E731
            compiled[rec] = jax.jit(fresh).lower(lora_state, rest, x).compile()
    assert compiled[True].as_text() != compiled[False].as_text()
    assert compiled_flops(compiled[True]) <= compiled_flops(compiled[False])


@pytest.mark.parametrize("remat", ["none", "names", pytest.param("full", marks=pytest.mark.slow)])
def test_lemo_loss_and_grads_match_the_token_level_path(model, remat):
    """The LeMo loss and its LoRA gradient with block movement (and, where it applies, input
    recovery) equal those of the same selections routed token by token."""
    lemo = spec_lemo(block_size=BLOCK, keep_ratio=0.5, schedule="all", mlp_mode="dense")
    ratios = lemo.keep_ratios(CONFIG.n_layers)
    sels = [_block_selection(30 + i, routing.capacity(NB, r, rounding="floor"), n_valid=(NB, NB))
            for i, r in enumerate(ratios)]
    tokens = jax.random.randint(jax.random.key(31), (B, T), 0, CONFIG.vocab_size)
    batch = Batch(tokens, jnp.broadcast_to(jnp.arange(T), (B, T)), jnp.zeros((B, T), jnp.int32))
    model.remat = remat

    def run(selections):
        fn = nnx.value_and_grad(
            lambda m, b: lemo_forward.lemo_loss(m, b, lemo=lemo, selections=selections)[0],
            argnums=nnx.DiffState(0, lora.LoRAParam))
        return nnx.jit(fn)(model, batch)

    try:
        loss_b, g_b = run(sels)
        loss_t, g_t = run([s.tokens() for s in sels])
    finally:
        model.remat = "none"
    np.testing.assert_allclose(loss_b, loss_t, rtol=1e-6)
    leaves_b, leaves_t = jax.tree.leaves(g_b), jax.tree.leaves(g_t)
    assert len(leaves_b) == len(leaves_t) > 1
    for b, t in zip(leaves_b, leaves_t, strict=True):
        np.testing.assert_allclose(b, t, rtol=1e-4, atol=1e-5 * np.abs(t).max())


@pytest.mark.slow
def test_input_recovery_in_bfloat16_adds_no_error_beyond_bfloat16s_own():
    """In bf16 the recovered rows x_k = h_k − a carry the rounding of h = x + a; the gradients must
    stay as close to the float32 ones as the plain bf16 path's are."""
    def grads(dtype, recovery):
        cfg = CONFIG.replace(dtype=dtype, param_dtype="float32")
        m = lora.add_lora(Llama(cfg, rngs=nnx.Rngs(0)), LoRAConfig(), rngs=nnx.Rngs(1))
        leaves, tree = jax.tree.flatten(lora.lora_state(m))
        keys = jax.random.split(jax.random.key(0), len(leaves))
        nnx.update(m, jax.tree.unflatten(
            tree, [0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))
        x = (4.0 * jax.random.normal(jax.random.key(40), (B, T, cfg.d_model))).astype(dtype)
        _, g = _sublayer_vjp(m.layers[1], x, _block_selection(41, 4), recovery)
        return [np.asarray(leaf, np.float32) for leaf in jax.tree.leaves(g)]

    ref = grads("float32", False)

    def errors(got):
        return [np.linalg.norm(g - r) / np.linalg.norm(r) for g, r in zip(got, ref, strict=True)]

    plain, recovered = errors(grads("bfloat16", False)), errors(grads("bfloat16", True))
    assert max(plain) > 1e-3  # bf16 is really in play
    for e, p in zip(recovered, plain, strict=True):
        assert e <= 1.25 * p + 1e-3, (recovered, plain)
