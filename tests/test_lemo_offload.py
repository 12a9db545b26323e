"""Jenga's sparsity-sensitive activation offload: per-layer budgets as per-kind remat policies."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora
from tokensparse.config import LoRAConfig, preset
from tokensparse.data.batching import Batch
from tokensparse.lemo import offload
from tokensparse.lemo.forward import lemo_loss
from tokensparse.llama import Llama
from tokensparse.remat import split_by_budget

CONFIG = preset("tiny").replace(n_layers=3)  # d 64, 4 heads, 2 KV heads of 16, fp32
B, T, BLOCK = 2, 128, 16
KEPT = 64  # keep 0.5 of 8 blocks of 16
# By hand, in bytes (fp32): q, k, v rows of (4 + 2 + 2) * 16; the output rows of 4 * 16.
DENSE = {"qkv": B * T * 8 * 16 * 4, "attn_core": B * T * 4 * 16 * 4}
SPARSE = {"qkv": B * KEPT * 8 * 16 * 4, "attn_core": B * KEPT * 4 * 16 * 4}
STREAM = B * T * 64 * 4


def test_named_bytes_by_hand():
    dense = offload.named_bytes(CONFIG, B, T, 1.0, BLOCK)
    sparse = offload.named_bytes(CONFIG, B, T, 0.5, BLOCK)
    for name in ("block_in", "attn_out", "mlp_out"):
        assert dense[name] == sparse[name] == STREAM
    for name in DENSE:
        assert dense[name] == DENSE[name] and sparse[name] == SPARSE[name]
    assert offload.kept_rows(T, 0.45, BLOCK) == 48  # floor(0.45 * 8) = 3 blocks


def test_split_by_budget_and_budgets():
    sizes = {"qkv": 3.0, "attn_core": 1.0}
    assert split_by_budget(("qkv", "attn_core"), sizes, 4.0) == (("qkv", "attn_core"), ())
    assert split_by_budget(("qkv", "attn_core"), sizes, 2.0) == (("attn_core",), ("qkv",))
    assert split_by_budget(("qkv", "attn_core"), sizes, 0.5) == ((), ("qkv", "attn_core"))
    assert offload.layer_budgets("uniform", 5.0, [4.0, 1.0, 1.0]) == [5.0, 5.0, 5.0]
    sparsity = offload.layer_budgets("sparsity", 5.0, [4.0, 1.0, 1.0])
    np.testing.assert_allclose(sparsity, [10.0, 2.5, 2.5])  # same total, shares 4 : 1 : 1
    with pytest.raises(ValueError, match="uniform"):
        offload.layer_budgets("none", 5.0, [1.0])


def test_config_checks():
    with pytest.raises(ValueError, match="offload_budget_mib > 0"):
        spec_lemo(offload="uniform")
    with pytest.raises(ValueError, match="must be one of"):
        spec_lemo(offload="all", offload_budget_mib=1.0)


MIB = 2**20
# Uniform budget: a dense layer's attn_core (64 KiB) fits but its qkv (128 KiB) does not; a sparse
# layer's qkv (64 KiB) and attn_core (32 KiB) both fit.
UNIFORM = spec_lemo(block_size=BLOCK, keep_ratio=0.5, mlp_mode="dense", offload="uniform",
                     offload_budget_mib=100 * 1024 / MIB)


def test_plans_follow_the_keep_ratio():
    ratios = UNIFORM.keep_ratios(3)
    assert ratios == (0.5, 0.5, 1.0)
    names = ("qkv", "attn_core")
    uniform = offload.offload_plan(CONFIG, UNIFORM, ratios, names, B, T)
    assert [p.offloaded for p in uniform] == [names, names, ("attn_core",)]
    assert [p.saved for p in uniform] == [(), (), ("qkv",)]
    # Sparsity-aware: the same 300 KiB total, in proportion 96 : 96 : 192 KiB of candidates.
    sparsity = offload.offload_plan(CONFIG, UNIFORM.replace(offload="sparsity"), ratios, names, B, T)
    np.testing.assert_allclose([p.budget_bytes for p in sparsity],
                               np.array([75, 75, 150]) * 1024)
    # The most bytes within each budget: q, k, v everywhere (64 <= 75 and 128 <= 150 KiB).
    assert [p.offloaded for p in sparsity] == [("qkv",), ("qkv",), ("qkv",)]
    assert [p.saved for p in sparsity] == [("attn_core",)] * 3
    np.testing.assert_allclose(sum(p.budget_bytes for p in sparsity),
                               sum(p.budget_bytes for p in uniform))


def _setup():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)), jnp.int32)
    seg = np.zeros((B, T), np.int32)
    seg[1, 70:] = 1
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    pos[1, 70:] -= 70
    return Batch(tokens, jnp.asarray(pos, jnp.int32), jnp.asarray(seg))


def _grad_fn(remat, lemo, batch):
    model = Llama(CONFIG, attention_backend="xla", remat=remat, rngs=nnx.Rngs(0))
    lora.add_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    for path, var in nnx.state(model, lora.LoRAParam).flat_state():
        var.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), var[...].shape))
    graphdef, lora_state, rest = nnx.split(model, lora.LoRAParam, ...)

    def f(lora_state):
        return lemo_loss(nnx.merge(graphdef, lora_state, rest), batch, lemo=lemo)[0]
    return jax.value_and_grad(f), lora_state


def _host_shapes(jaxpr) -> collections.Counter:
    """Shapes of the values the program moves to host memory, counted per traced op (at any depth:
    a scan's body once for all its layers)."""
    shapes = collections.Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "device_put":
            for var in eqn.outvars:
                if "host" in str(getattr(var.aval, "memory_space", "")).lower():
                    shapes[tuple(var.aval.shape)] += 1
        for param in eqn.params.values():
            for inner in (param if isinstance(param, (tuple, list)) else (param,)):
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    shapes += _host_shapes(inner)
    return shapes


def test_offload_moves_what_the_budget_says_and_changes_no_values():
    """On CPU host memory is device memory: loss and LoRA gradients equal remat=names without
    offload (and remat=none); the program moves to host exactly the tensors the plan picks. Uniform:
    the sparse layers' (one scan) q, k, v and attention output at the kept rows, the dense layer's
    attention output. Sparsity-aware: q, k, v in every layer, sparse and dense."""
    batch = _setup()
    want_fn, state = _grad_fn("none", UNIFORM.replace(offload="none"), batch)
    names_fn, _ = _grad_fn("names", UNIFORM.replace(offload="none"), batch)
    got_fn, _ = _grad_fn("names", UNIFORM, batch)
    jitted = jax.jit(got_fn)
    got_loss, got = jitted(state)
    for fn in (want_fn, names_fn):
        loss, grads = jax.jit(fn)(state)
        np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(grads), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-8)

    heads, kv_heads, dh = CONFIG.n_heads, CONFIG.n_kv_heads, CONFIG.head_dim
    shapes = _host_shapes(jax.make_jaxpr(got_fn)(state).jaxpr)
    assert shapes == {(B, KEPT, heads, dh): 2, (B, KEPT, kv_heads, dh): 2, (B, T, heads, dh): 1}
    assert not _host_shapes(jax.make_jaxpr(names_fn)(state).jaxpr)
    sparsity_fn, _ = _grad_fn("names", UNIFORM.replace(offload="sparsity"), batch)
    shapes = _host_shapes(jax.make_jaxpr(sparsity_fn)(state).jaxpr)
    assert shapes == {(B, KEPT, heads, dh): 1, (B, KEPT, kv_heads, dh): 2,
                      (B, T, heads, dh): 1, (B, T, kv_heads, dh): 2}, shapes


def test_offload_needs_a_names_policy():
    batch = _setup()
    fn, state = _grad_fn("full", UNIFORM, batch)
    with pytest.raises(ValueError, match="remat='names' or 'offload'"):
        jax.eval_shape(fn, state)
