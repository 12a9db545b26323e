"""Meshes and sharding on 8 simulated CPU devices: the logical-axis rules, per-shard routing, and one
train step of dense, LeMo and SUBLLM on four mesh shapes equal to the same step on one device."""

import functools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _lemo import spec_lemo
from flax import nnx
from jax.sharding import PartitionSpec as P

from tokensparse import lora, routing, sharding, train
from tokensparse.checkpoint import Checkpointer
from tokensparse.config import LoRAConfig, MeshConfig, TrainConfig, preset
from tokensparse.lemo.forward import lemo_loss
from tokensparse.llama import Llama
from tokensparse.subllm import training as subllm_training
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import subllm_preset

MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 1, 4), (2, 1, 1, 4)]
# q_dim (32) and kv_dim (16) differ from d_model (64), so an all-gathered [B, T, D] is unambiguous.
CONFIG = preset("tiny").replace(n_heads=4, n_kv_heads=2, head_dim=8)
B, T = 8, 128
TC = TrainConfig(lr=2e-4, warmup_steps=0, schedule="constant")


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    segment_ids: jax.Array


def _batch(t=T, seed=0):
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (B, t), 0, CONFIG.vocab_size), np.int32)
    segments = np.zeros((B, t), np.int32)
    segments[1, t // 3:] = 1  # a packed second document
    segments[2, -t // 4:] = -1  # a padded tail
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (B, t)).copy()
    positions[1, t // 3:] -= t // 3
    return Batch(tokens, positions, segments)


def _laid_out(x: jax.Array, spec: P) -> bool:
    return x.sharding.is_equivalent_to(jax.NamedSharding(x.sharding.mesh, spec), x.ndim)


# --- rules and helpers ---------------------------------------------------------------------------


def test_mesh_config_fills_and_validates():
    assert MeshConfig().shape(8) == (8, 1, 1, 1)
    assert MeshConfig(data=2, fsdp=-1, tensor=2).shape(8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="at most one axis"):
        MeshConfig(data=-1, seq=-1)
    assert MeshConfig(data=3, fsdp=2).shape(8) == (3, 2, 1, 1)  # the first 6 devices
    with pytest.raises(ValueError, match="needs 16 devices"):
        MeshConfig(data=4, fsdp=4).shape(8)
    with pytest.raises(ValueError, match="does not divide"):
        MeshConfig(fsdp=3).shape(8)
    with pytest.raises(ValueError, match="must be >= 1"):
        MeshConfig(tensor=0)
    mesh = sharding.make_mesh(MeshConfig(fsdp=2, tensor=2, seq=2))
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2, "seq": 2}


def test_logical_to_spec_uses_each_axis_once_and_skips_indivisible_dims():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "act_embed"), (8, 16, 64), mesh) == \
        P(("data", "fsdp"), None, None)  # seq has size 1: dropped
    assert sharding.logical_to_spec(("embed", "heads"), (64, 3), mesh) == P("fsdp", None)
    assert sharding.logical_to_spec(("batch", None), (6, 4), mesh) == P(None, None)  # 6 % 4 != 0
    rules = (("a", "tensor"), ("b", "tensor"))
    assert sharding.logical_to_spec(("a", "b"), (4, 4), mesh, rules) == P("tensor", None)
    with pytest.raises(ValueError, match="rank 1"):
        sharding.logical_to_spec(("a", "b"), (4,), mesh)


def test_constrain_is_identity_without_a_mesh_and_rules_can_be_replaced():
    x = jnp.ones((4, 8))
    assert sharding.constrain(x, ("batch", "length")) is x
    assert sharding.seq_shards() == 1 and sharding.route_shards(3) == 3
    mesh = sharding.make_mesh(MeshConfig(data=2, seq=4))
    with jax.set_mesh(mesh):
        assert sharding.seq_shards() == 4 and sharding.route_shards() == 4
        y = jax.jit(lambda a: sharding.constrain(a, ("batch", "length")))(x)
        assert _laid_out(y, P("data", "seq"))
        with sharding.axis_rules((("batch", "seq"), ("length", None))):
            z = jax.jit(lambda a: sharding.constrain(a, ("batch", "length")) * 1)(x)
        assert _laid_out(z, P("seq"))


def test_parameters_carry_logical_axes():
    model = lora.add_lora(Llama(CONFIG, rngs=nnx.Rngs(0)), LoRAConfig(targets=("q", "down")),
                          rngs=nnx.Rngs(1))
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    meta = lambda v: v.get_metadata().get("logical_axes")  # noqa: E731
    assert meta(model.embed.embedding) == ("vocab", "embed")
    assert meta(attn.q_proj.kernel) == ("embed", "heads") and meta(attn.o_proj.kernel) == ("heads", "embed")
    assert meta(attn.k_proj.kernel) == ("embed", "kv_heads")
    assert meta(mlp.gate_proj.kernel) == ("embed", "mlp") and meta(mlp.down_proj.kernel) == ("mlp", "embed")
    assert meta(attn.q_proj.adapter.a) == ("embed", None) and meta(attn.q_proj.adapter.b) == (None, "heads")
    assert meta(mlp.down_proj.adapter.a) == ("mlp", None)
    assert meta(model.layers[0].input_norm.scale) is None  # replicated


# --- per-shard routing ---------------------------------------------------------------------------


def test_per_shard_topk_equals_topk_on_each_piece():
    scores = jax.random.normal(jax.random.key(0), (3, 24))
    valid = jax.random.bernoulli(jax.random.key(1), 0.7, (3, 24))
    sel = routing.topk_select(scores, 7, valid, shards=4)  # ceil(7/4) = 2 per piece of 6
    assert sel.shards == 4 and sel.indices.shape == (3, 8)
    idx = np.asarray(sel.indices)
    assert (np.diff(idx, axis=1) > 0).all()  # still globally ascending
    for s in range(4):
        piece = routing.topk_select(scores[:, 6 * s:6 * s + 6], 2, valid[:, 6 * s:6 * s + 6])
        np.testing.assert_array_equal(idx[:, 2 * s:2 * s + 2], np.asarray(piece.indices) + 6 * s)
        np.testing.assert_array_equal(np.asarray(sel.valid)[:, 2 * s:2 * s + 2], np.asarray(piece.valid))
    with pytest.raises(ValueError, match="equal sequence shards"):
        routing.topk_select(scores, 7, shards=5)


def test_shard_local_gather_and_scatter_equal_the_global_ones():
    x = jax.random.normal(jax.random.key(2), (3, 24, 5))
    sel = routing.topk_select(jax.random.normal(jax.random.key(3), (3, 24)), 8,
                              jnp.arange(24)[None, :] % 5 != 0, shards=4)
    flat = routing.Selection(sel.indices, sel.valid)  # same slots, addressed globally
    np.testing.assert_array_equal(routing.gather(x, sel, fill_value=-1.0),
                                  routing.gather(x, flat, fill_value=-1.0))
    vals = jax.random.normal(jax.random.key(4), (3, 8, 5))
    np.testing.assert_array_equal(routing.scatter_add(x, sel, vals), routing.scatter_add(x, flat, vals))
    g_local = jax.grad(lambda a, v: jnp.sum(routing.scatter_add(a, sel, v) ** 2), (0, 1))(x, vals)
    g_flat = jax.grad(lambda a, v: jnp.sum(routing.scatter_add(a, flat, v) ** 2), (0, 1))(x, vals)
    for a, b in zip(g_local, g_flat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


# --- one train step on a mesh == on one device ---------------------------------------------------


def _randomise(model, wrt, seed):
    leaves, tree = jax.tree.flatten(nnx.state(model, wrt))
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]))


def _dense(route_shards, layout=None, backend="xla"):
    del route_shards
    model = Llama(CONFIG, attention_backend=backend, rngs=nnx.Rngs(0))
    return model, nnx.Param, train.make_optimizer(TC), \
        lambda m, b: train.lm_loss(m, b, layout=layout), False


def _lemo(route_shards, layout=None):
    model = lora.add_lora(Llama(CONFIG.replace(n_layers=3), attention_backend="xla", rngs=nnx.Rngs(0)),
                          LoRAConfig(), rngs=nnx.Rngs(1))
    _randomise(model, lora.LoRAParam, 2)
    lemo = spec_lemo(block_size=16, keep_ratio=0.5, schedule="all", route_shards=route_shards)
    return model, lora.LoRAParam, train.make_optimizer(TC), \
        lambda m, b: lemo_loss(m, b, lemo=lemo, layout=layout), False


def _subllm(route_shards, layout=None):
    base = subllm_preset("subllm-tiny")
    cfg = base.replace(model=CONFIG.replace(n_layers=4), structure="T(T(T)T)", route_shards=route_shards)
    model = SubLLM(cfg, attention_backend="xla", rngs=nnx.Rngs(0))
    for scorer in model.scorers:  # scores of order 1: weights and the discard penalty matter
        scorer.weight[...] = scorer.weight[...] * 30.0
    return model, nnx.Param, subllm_training.make_optimizer(TC), \
        subllm_training.train_loss(seed=1, layout=layout), True


BUILDERS = {"dense": _dense, "lemo": _lemo, "subllm": _subllm,
            "dense_chunked": functools.partial(_dense, backend="chunked")}


def _train_step(kind, mesh=None, route_shards=0, layout=None):
    """Build, (shard,) step once; returns (metrics, model, optimizer, compiled HLO text or None)."""
    model, wrt, tx, loss_fn, pass_step = BUILDERS[kind](route_shards, layout)
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    step = train.make_train_step(loss_fn, wrt, pass_step=pass_step)
    batch = _batch()
    if mesh is None:
        return step(model, optimizer, batch), model, optimizer, None
    with jax.set_mesh(mesh):
        sharding.shard(model, optimizer)
        batch = sharding.shard_batch(batch)
        hlo = step.lower(model, optimizer, batch).compile().as_text()
        metrics = step(model, optimizer, batch)
    return metrics, model, optimizer, hlo


_references: dict = {}


def _reference(kind, seq, layout=None):
    if (kind, seq, layout) not in _references:
        metrics, model, _, _ = _train_step(kind, route_shards=seq, layout=layout)
        _references[kind, seq, layout] = (jax.device_get(metrics), jax.device_get(nnx.state(model)))
    return _references[kind, seq, layout]


def full_activation_all_gathers(hlo: str, t: int, d: int) -> list[str]:
    """All-gathers in compiled HLO whose result is [b, t, d], gathered over the batch or the
    sequence: a whole residual stream. (Not an FSDP gather of a stacked [1, in, out] weight, over
    its last dimension, which has the same shape when in, out = t, d.)"""
    gathers = re.findall(r"= \w+\[(\d+),(\d+),(\d+)\][^ ]* all-gather\(.*?dimensions=\{([\d,]+)\}",
                         hlo)
    return [s[:3] for s in gathers if s[1:3] == (str(t), str(d))
            and {"0", "1"} & set(s[3].split(","))]


ZIGZAG = functools.partial(sharding.zigzag_order, shards=4, multiple=16)  # LeMo's 16-token blocks


@pytest.mark.parametrize("kind", ["dense", "lemo", "subllm"])
@pytest.mark.parametrize("shape, layout", [*((m, None) for m in MESHES), ((2, 1, 1, 4), ZIGZAG)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("zigzag" if v else "contiguous"))
def test_train_step_on_a_mesh_equals_one_device(kind, shape, layout):
    mesh = sharding.make_mesh(MeshConfig(*shape))
    metrics, model, optimizer, hlo = _train_step(kind, mesh, layout=layout)
    ref_metrics, ref_state = _reference(kind, shape[3], layout)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(ref_metrics["grad_norm"]), rtol=1e-4)
    state = nnx.state(model)
    for (path, got), want in zip(nnx.to_flat_state(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(got.get_value()), np.asarray(want), atol=1e-5, rtol=1e-5,
                                   err_msg=str(path))
    # Updated parameters and optimizer moments come out with the configured shardings.
    for tree in (model, optimizer):
        flat_state = nnx.to_flat_state(nnx.state(tree))
        flat_want = nnx.to_flat_state(sharding.state_shardings(tree, mesh))
        for (path, var), (_, want) in zip(flat_state, flat_want, strict=True):
            got = var.get_value().sharding
            assert got.is_equivalent_to(want, var.get_value().ndim), (path, got, want)
    kernel = model.layers[0].mlp.down_proj.kernel.get_value()
    expected = {(8, 1, 1, 1): P(), (2, 2, 2, 1): P("tensor", "fsdp"), (1, 2, 1, 4): P(None, "fsdp"),
                (2, 1, 1, 4): P()}[shape]
    assert _laid_out(kernel, expected)
    for width in (CONFIG.d_model, CONFIG.ffn_dim):  # residual stream; MLP activations (LeMo ranks them)
        assert full_activation_all_gathers(hlo, T, width) == [], width


def test_the_all_gather_check_can_fail():
    """A forced replication of the residual stream shows up as an all-gather of [B, T, D]."""
    mesh = sharding.make_mesh(MeshConfig(data=2, seq=4))
    x = jax.device_put(jnp.ones((B, T, CONFIG.d_model)), sharding.batch_sharding((B, T, 64), mesh))
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda a: jax.lax.with_sharding_constraint(a, P()) * 2).lower(x).compile().as_text()
    assert full_activation_all_gathers(hlo, T, CONFIG.d_model)


def test_sequence_sharded_selection_differs_from_global_but_overlaps():
    """Per-shard top-k keeps the same count in every piece; measure how much of the global choice it
    keeps on random scores (documented in docs/sharding.md)."""
    scores = jax.random.normal(jax.random.key(5), (64, 64))
    glob = np.asarray(routing.topk_select(scores, 16).indices)
    local = np.asarray(routing.topk_select(scores, 16, shards=4).indices)
    overlap = np.mean([len(set(a) & set(b)) / 16 for a, b in zip(glob, local, strict=True)])
    assert 0.6 < overlap < 1.0


def test_sharded_checkpoint_restores_onto_another_mesh(tmp_path):
    source = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with jax.set_mesh(source):
        model = Llama(CONFIG, rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
        sharding.shard(model, optimizer)
        saved = jax.device_get(nnx.state(model))
        with Checkpointer(tmp_path, save_every=1) as ckpt:
            ckpt.save(3, {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, {})
    target = sharding.make_mesh(MeshConfig(data=1, fsdp=2, seq=4))
    with jax.set_mesh(target):
        fresh = Llama(CONFIG, rngs=nnx.Rngs(9))
        fresh_opt = nnx.Optimizer(fresh, optax.adam(1e-3), wrt=nnx.Param)
        sharding.shard(fresh, fresh_opt)
        with Checkpointer(tmp_path, save_every=1) as ckpt:
            restored, _ = ckpt.restore({"model": nnx.state(fresh), "optimizer": nnx.state(fresh_opt)})
    nnx.update(fresh, restored["model"])
    for got, want in zip(jax.tree.leaves(nnx.state(fresh)), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    kernel = fresh.layers[0].attn.q_proj.kernel.get_value()
    assert kernel.sharding.mesh.shape == target.shape
    assert _laid_out(kernel, P("fsdp"))


def test_zigzag_order_balances_causal_work():
    order = sharding.zigzag_order(64, 4)
    assert sorted(order) == list(range(64))
    pieces = order.reshape(4, 16)
    assert pieces[0].tolist() == [*range(0, 8), *range(56, 64)]  # chunks 0 and 7
    assert pieces[3].tolist() == [*range(24, 40)]  # chunks 3 and 4
    work = lambda p: (p + 1).sum(axis=1)  # noqa: E731  (keys each query attends to)
    assert len(set(work(pieces).tolist())) == 1
    contiguous = work(np.arange(64).reshape(4, 16))
    assert contiguous[-1] / contiguous[0] > 5
    assert sharding.zigzag_order(64, 1).tolist() == list(range(64))
    with pytest.raises(ValueError, match="16-token blocks"):
        sharding.zigzag_order(64, 4, multiple=16)  # chunks of 8 tokens would split the blocks
    with pytest.raises(ValueError, match="8 equal chunks"):
        sharding.zigzag_order(100, 4)


def test_a_layout_leaves_the_dense_loss_and_gradients_unchanged():
    model = Llama(CONFIG, attention_backend="xla", rngs=nnx.Rngs(0))
    batch = _batch()
    grad = nnx.value_and_grad(lambda m, layout: train.lm_loss(m, batch, layout=layout)[0])
    (loss, g), (loss_z, g_z) = grad(model, None), grad(model, ZIGZAG)
    np.testing.assert_allclose(loss_z, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_z), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_chunked_attention_on_a_seq_mesh_keeps_queries_local():
    """The flash-style backend attends each seq shard's own queries (vmap over pieces): same step as
    one device, and the only sequence-length all-gathers are keys/values and their masks."""
    mesh = sharding.make_mesh(MeshConfig(data=2, seq=4))
    metrics, model, _, hlo = _train_step("dense_chunked", mesh, layout=ZIGZAG)
    ref_metrics, ref_state = _reference("dense", 4, ZIGZAG)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref_metrics["loss"]), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    gathered = [tuple(map(int, s.split(","))) for s in
                re.findall(r"= \w+\[([\d,]+)\][^ ]* all-gather\(", hlo)]
    full_length = [s for s in gathered if T in s[1:2]]
    assert full_length, "keys and values must be gathered over seq"
    kv = (CONFIG.n_kv_heads, CONFIG.head_dim)
    assert all(len(s) == 2 or (len(s) == 4 and s[2:] == kv) or (len(s) == 3 and s[2] == CONFIG.kv_dim)
               for s in full_length), full_length
