"""Jenga's two-dimensional sparsity: shifted sparse attention on the compacted kept sequence."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _lemo import spec_lemo
from flax import nnx

from tokensparse import lora
from tokensparse.config import LoRAConfig, preset
from tokensparse.data.batching import Batch
from tokensparse.flops import compiled_flops
from tokensparse.lemo import forward, two_d
from tokensparse.lemo.forward import lemo_loss
from tokensparse.llama import Llama


def _inputs(b, t, h, hkv, d=8, *, seed=0, packed=False, pad=0):
    """Random q, k, v at increasing positions with gaps (a compacted subset of a longer sequence),
    optionally two packed documents per row and ``pad`` padding slots (segment -1) at the end."""
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, h, d))
    k = jax.random.normal(keys[1], (b, t, hkv, d))
    v = jax.random.normal(keys[2], (b, t, hkv, d))
    rng = np.random.default_rng(seed)
    pos = np.sort(rng.choice(4 * t, size=(b, t), replace=True), axis=1) + np.arange(t)
    seg = np.zeros((b, t), np.int32)
    if packed:
        for row in range(b):
            cut = rng.integers(1, t - 1)
            seg[row, cut:] = 1
            pos[row, cut:] -= pos[row, cut]  # the second document restarts its positions
    if pad:
        seg[:, t - pad:] = -1
        pos[:, t - pad:] = 0
    return q, k, v, jnp.asarray(pos, jnp.int32), jnp.asarray(seg, jnp.int32)


def test_group_ids_by_hand():
    # 16 rows in 8 groups: g = 2, the shifted half is offset by one row and does not wrap.
    np.testing.assert_array_equal(two_d.group_ids(16, 8, shifted=False),
                                  [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7])
    np.testing.assert_array_equal(two_d.group_ids(16, 8, shifted=True),
                                  [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8])
    # 10 rows in 4 groups: g = 3, the shift is 1.
    np.testing.assert_array_equal(two_d.group_ids(10, 4, shifted=True),
                                  [0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    assert two_d.shifted_heads(4) == (2, 4) and two_d.shifted_heads(9) == (4, 9)


def test_visibility_pattern_is_groups_within_causal():
    """Which values each query's output reads (the Jacobian of the fast path by v is the attention
    probability), against groups written out by hand: unshifted {0,1}{2,3}..., shifted
    {0}{1,2}...{13,14}{15} (no wrap), and causal within each."""
    t = 16
    q, k, v, _, _ = _inputs(1, t, 2, 2)
    pos = jnp.arange(t, dtype=jnp.int32)[None]

    def out_from_v(v):
        return two_d.shifted_sparse_attention(q, k, v, pos, backend="xla", groups=8)

    jac = jax.jacrev(out_from_v)(v)  # [1, t, 2, d, 1, t, 2, d]
    dep = np.abs(np.asarray(jac)).sum(axis=(0, 3, 4, 7))  # [t, h_out, t, h_v]
    unshifted = [{j for j in range(t) if j // 2 == i // 2 and j <= i} for i in range(t)]
    groups = [{0}] + [{a, a + 1} for a in range(1, 15, 2)] + [{15}]
    shifted = [{j for j in next(g for g in groups if i in g) if j <= i} for i in range(t)]
    for head, want in ((0, unshifted), (1, shifted)):
        for i in range(t):
            seen = {j for j in range(t) if dep[i, head, j, head] > 0}
            assert seen == want[i], (head, i, seen, want[i])
        assert not np.any(dep[:, head, :, 1 - head])  # heads do not mix


CASES = {
    "mha": dict(b=2, t=64, h=4, hkv=4),
    "gqa": dict(b=2, t=64, h=8, hkv=2),
    "gqa_split_inside_a_kv_group": dict(b=1, t=48, h=9, hkv=3),  # SmolLM2's heads
    "packed_and_padded": dict(b=2, t=64, h=4, hkv=2, packed=True, pad=10),
    "ragged_length": dict(b=2, t=50, h=4, hkv=2, packed=True, pad=3),  # g = 7, odd; 6 padded rows
}


@pytest.mark.parametrize(("case", "backend"), [(c, "xla") for c in CASES] + [
    ("gqa", "chunked"), ("ragged_length", "chunked")])
def test_fast_path_equals_dense_reference_forward_and_gradient(case, backend):
    kw = dict(CASES[case])
    packed, pad = kw.pop("packed", False), kw.pop("pad", 0)
    q, k, v, pos, seg = _inputs(**kw, packed=packed, pad=pad, seed=len(case))
    cot = jax.random.normal(jax.random.key(7), q.shape)
    fast = functools.partial(two_d.shifted_sparse_attention, backend=backend)
    ref = two_d.reference_shifted_sparse_attention

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v, pos, seg) * cot)

    def value_and_grads(fn):
        return jax.jit(jax.value_and_grad(functools.partial(loss, fn), argnums=(0, 1, 2)))(q, k, v)

    out = jax.jit(fast)(q, k, v, pos, seg)
    np.testing.assert_allclose(out, jax.jit(ref)(q, k, v, pos, seg), atol=2e-5)
    (got_loss, got), (want_loss, want) = value_and_grads(fast), value_and_grads(ref)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-5)
    if pad:  # padding rows see nothing
        assert not np.any(np.asarray(out)[:, -pad:])


def test_one_group_is_full_attention_for_the_unshifted_heads():
    """With one group the unshifted heads attend over everything; the shifted ones, which do not
    wrap, over the two halves."""
    from tokensparse.attention import attention

    q, k, v, pos, seg = _inputs(1, 64, 4, 2, packed=True)
    full = attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                     kv_segment_ids=seg, backend="reference")
    one = jax.jit(functools.partial(two_d.shifted_sparse_attention, backend="xla", groups=1))(
        q, k, v, pos, seg)
    np.testing.assert_allclose(one[:, :, :2], full[:, :, :2], atol=2e-5)
    halves = [attention(*(x[:, s] for x in (q, k, v)), q_positions=pos[:, s],
                        kv_positions=pos[:, s], q_segment_ids=seg[:, s], kv_segment_ids=seg[:, s],
                        backend="reference") for s in (slice(0, 32), slice(32, 64))]
    np.testing.assert_allclose(one[:, :, 2:], jnp.concatenate(halves, axis=1)[:, :, 2:], atol=2e-5)
    eight = jax.jit(functools.partial(two_d.shifted_sparse_attention, backend="xla"))(
        q, k, v, pos, seg)
    assert not np.allclose(eight, full, atol=1e-3)


def test_attention_flops_fall_by_the_group_count():
    """Compiled matmul FLOPs: grouped attention costs about 1/8 of full attention on the same
    compacted sequence (the projections are not part of this function)."""
    from tokensparse.attention import attention

    q, k, v, pos, seg = _inputs(1, 512, 4, 4, d=32)

    def full(q, k, v):
        return attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                         kv_segment_ids=seg, backend="xla")

    def grouped(q, k, v):
        return two_d.shifted_sparse_attention(q, k, v, pos, seg, backend="xla")

    flops = {name: compiled_flops(jax.jit(fn).lower(q, k, v).compile())
             for name, fn in (("full", full), ("grouped", grouped))}
    assert flops["full"] > 0
    ratio = flops["grouped"] / flops["full"]
    assert 0.1 < ratio < 0.15, flops  # 1/8 = 0.125


def test_refuses_a_kv_cache_and_bad_groups():
    q, k, v, pos, seg = _inputs(1, 16, 2, 2)
    with pytest.raises(ValueError, match="KV cache"):
        two_d.shifted_sparse_attention(q, k, v, pos, seg, pos, seg)
    with pytest.raises(ValueError, match="groups >= 1"):
        two_d.shifted_sparse_attention(q, k, v, pos, seg, groups=0)


def _lora_model(config):
    model = Llama(config, attention_backend="xla", rngs=nnx.Rngs(0))
    lora.add_lora(model, LoRAConfig(rank=4), rngs=nnx.Rngs(1))
    for path, var in nnx.state(model, lora.LoRAParam).flat_state():
        var.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), var[...].shape))
    return model


def test_lemo_two_d_runs_only_in_sparse_layers_and_matches_the_reference(monkeypatch):
    """Through lemo_loss: the hook sees only sparse layers' kept rows (never the full sequence),
    and the loss and LoRA gradients equal those with the dense-reference core plugged in."""
    config = preset("tiny").replace(n_layers=3)  # layers 0, 1 sparse; 2 dense
    model = _lora_model(config)
    t, block = 128, 16
    lemo = spec_lemo(block_size=block, keep_ratio=0.5, two_d=True, mlp_mode="dense")
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, t)), jnp.int32)
    seg = np.zeros((2, t), np.int32)
    seg[1, 80:] = 1
    pos = np.broadcast_to(np.arange(t), (2, t)).copy()
    pos[1, 80:] -= 80
    batch = Batch(tokens, jnp.asarray(pos, jnp.int32), jnp.asarray(seg))
    graphdef, lora_state, rest = nnx.split(model, lora.LoRAParam, ...)

    def value_and_grad(cfg):
        def f(lora_state):
            return lemo_loss(nnx.merge(graphdef, lora_state, rest), batch, lemo=cfg)[0]
        return jax.jit(jax.value_and_grad(f))(lora_state)

    fast_loss, fast_grads = value_and_grad(lemo)
    plain_loss = jax.jit(lambda s: lemo_loss(nnx.merge(graphdef, s, rest), batch,
                                             lemo=lemo.replace(two_d=False))[0])(lora_state)
    assert abs(float(fast_loss) - float(plain_loss)) > 1e-6  # the option is plugged in

    rows = []

    def reference_core(attn, groups=two_d.GROUPS):
        def core(q, k, v, positions, segment_ids=None, kv_positions=None, kv_segment_ids=None):
            rows.append(q.shape[1])
            return two_d.reference_shifted_sparse_attention(q, k, v, positions, segment_ids,
                                                            groups=groups)
        return core

    monkeypatch.setattr(forward, "two_d_core", reference_core)
    ref_loss, ref_grads = value_and_grad(lemo)
    kept = int(0.5 * t // block) * block
    assert rows and set(rows) == {kept}, rows
    np.testing.assert_allclose(fast_loss, ref_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
