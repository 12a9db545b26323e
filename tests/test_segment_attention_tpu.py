"""The Mosaic (TPU) segment attention under the TPU interpreter vs the dense reference.

No TPU is needed: ``interpret=True`` runs the kernels in ``pltpu.InterpretParams`` mode, which
simulates VMEM/SMEM, the block DMAs (copied only when a block index changes) and uninitialised
scratch (filled with NaN, so a missed initialisation shows). Each grid step costs tens of milliseconds
there and each compiled case several seconds, so the cases are few and small: two tiles of 128 per
axis, three batch rows that each carry a different layout regime (packed documents with padding, a
compacted subset with scattered padding slots, random unsorted ids with rows that see no key), and
later tests reuse the compiled cases with other layouts. The Mosaic lowering itself (block-shape
legality) is checked by lowering for TPU on CPU. Imports nothing from ``tokensparse``; the
dispatcher's route to this kernel is tested in ``test_backends``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_segment_attention import Case, check_outputs, make_inputs, make_layout, rel_err

from kernels_pallas import tile_schedule as ts
from kernels_pallas.reference import BlockSizes, attention_mask, reference_attention
from kernels_pallas.segment_attention_tpu import segment_attention_tpu

# The interpreter's loops compile slowly and run the same at XLA's lowest optimisation level.
_JIT = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
_BLOCKS = (("block_q", 128), ("block_k", 128))

CASES = [
    # GQA, ragged length (200 -> 256), two tiles per axis: masked, unmasked and skipped tiles.
    Case("f32-gqa-causal", tq=200, tk=200, h=4, hkv=2, d=32, blocks=_BLOCKS),
    # kv longer than q, a group of 2, and backward blocks that differ from the forward's.
    Case("f32-noncausal-kv-longer", tq=136, tk=200, h=2, hkv=1, d=16, causal=False,
         blocks=(("block_q", 256), ("block_k", 128), ("block_q_dkv", 128))),
    Case("bf16-gqa-causal", tq=200, tk=200, h=2, hkv=1, d=32, dtype="bfloat16", blocks=_BLOCKS),
]
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _attn(attn, case: Case, layout):
    q_pos, kv_pos, q_seg, kv_seg = layout
    if not case.segments:
        q_seg = kv_seg = None
    return lambda q, k, v: attn(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=case.causal)


@functools.cache
def compiled(case: Case):
    """(kernel, reference): each maps (q, k, v, cot, *layout) to (out, dq, dk, dv)."""
    dtype = jnp.dtype(case.dtype)
    kernel = functools.partial(segment_attention_tpu, interpret=True,
                               blocks=BlockSizes(**dict(case.blocks)))

    def run(attn, q, k, v, cot, *layout):
        out, vjp = jax.vjp(_attn(attn, case, layout), q, k, v)
        return (out, *vjp(cot.astype(out.dtype)))

    def ours(q, k, v, cot, *layout):
        return run(kernel, q.astype(dtype), k.astype(dtype), v.astype(dtype), cot, *layout)

    def reference(q, k, v, cot, *layout):  # fp32 on the same rounded inputs: the truth
        q, k, v = (x.astype(dtype).astype(jnp.float32) for x in (q, k, v))
        return run(reference_attention, q, k, v, cot, *layout)

    return _JIT(ours), jax.jit(reference)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case):
    rng = np.random.default_rng(0)
    layout = make_layout(rng, case)
    q, k, v, cot = make_inputs(rng, case)
    ours, reference = compiled(case)
    empty_rows = check_outputs(case, ours(q, k, v, cot, *layout),
                               reference(q, k, v, cot, *layout), layout)
    assert (empty_rows > 0) == case.segments  # the layouts do exercise rows with no visible key


# ----------------------------------------------------------------------------- tile skipping


def _visited(sched) -> int:
    lo, hi = np.asarray(sched)[..., 0], np.asarray(sched)[..., 3]
    return int((hi - lo).sum())


def _check_sound(sched, mask, block_q: int, block_k: int):
    """Every tile pair holding a visible pair is in [lo, hi); every tile in [flo, fhi) is all visible."""
    b, tq, tk = mask.shape
    tiles = mask.reshape(b, tq // block_q, block_q, tk // block_k, block_k)
    some, every = tiles.any(axis=(2, 4)), tiles.all(axis=(2, 4))
    j = np.arange(tk // block_k)
    lo, flo, fhi, hi = (np.asarray(sched)[..., c, None] for c in range(4))
    assert not (some & ((j < lo) | (j >= hi))).any()
    assert every[(j >= flo) & (j < fhi)].all()
    return int(some.sum())


def test_schedule_skips_other_documents():
    """Eight packed documents of 128 tokens on 128-tiles: each query tile visits its diagonal only."""
    t, block, docs = 1024, 128, 8
    seg = jnp.asarray(np.arange(t) // (t // docs), jnp.int32)[None]
    pos = jnp.asarray(np.arange(t) % (t // docs), jnp.int32)[None]
    blocks = dict(fwd=(block, block), dq=(block, block), dkv=(block, block))
    fwd, dq, dkv = ts.schedules(pos, seg, pos, seg, **blocks, causal=True)
    n = t // block
    assert _visited(fwd) == _visited(dq) == _visited(dkv) == n  # of n * n tiles
    # Documents of 192 tokens straddle tiles. Tile stats are conservative (a tile's position range
    # spans its documents), so the schedule may visit a few needless tiles but never miss one.
    seg = jnp.asarray(np.arange(t) // 192, jnp.int32)[None]
    pos = jnp.asarray(np.arange(t) % 192, jnp.int32)[None]
    fwd, _, dkv = ts.schedules(pos, seg, pos, seg, **blocks, causal=True)
    mask = np.asarray(attention_mask(pos, pos, seg, seg, causal=True))
    needed = _check_sound(fwd, mask, block, block)
    assert _check_sound(dkv, np.swapaxes(mask, 1, 2), block, block) == needed
    assert needed <= _visited(fwd) == _visited(dkv) <= n * (n + 1) // 2 // 2


@pytest.mark.parametrize("case", CASES[:3], ids=lambda c: c.name)
def test_schedule_is_sound_on_test_layouts(case):
    """The schedules driving the kernels above (at their padded sizes) never skip a visible tile."""
    rng = np.random.default_rng(0)
    q_pos, kv_pos, q_seg, kv_seg = make_layout(rng, case)
    tq, tk = ts.round_up(case.tq, 256), ts.round_up(case.tk, 256)
    layout = ts.padded_layout(q_pos, kv_pos, q_seg, kv_seg, tq, tk)
    mask = np.asarray(attention_mask(layout[0], layout[2], layout[1], layout[3],
                                     causal=case.causal))
    for block_q, block_k in ((128, 128), (256, 128), (128, 256)):
        fwd, _, dkv = ts.schedules(*layout, fwd=(block_q, block_k), dq=(block_q, block_k),
                                   dkv=(block_q, block_k), causal=case.causal)
        _check_sound(fwd, mask, block_q, block_k)
        _check_sound(dkv, np.swapaxes(mask, 1, 2), block_k, block_q)


def test_kernel_never_reads_invisible_tiles():
    """NaN in every input row of an all-padding tile must not reach any output.

    Touching such a tile, even masked, would propagate the NaN (0 * NaN in p @ v, dp and the dk/dv
    products), so finite results that match the clean reference show the kernels skip it. Rows
    128..199 are padding slots, so with the wrapper's own padding to 256 the second tile is empty.
    """
    case = CASES[0]
    rng = np.random.default_rng(1)
    q_pos, kv_pos, q_seg, kv_seg = make_layout(rng, case)
    pad = np.arange(case.tq) >= 128
    q_seg, kv_seg = (jnp.where(pad[None], -1, x) for x in (q_seg, kv_seg))
    layout = (q_pos, kv_pos, q_seg, kv_seg)
    q, k, v, cot = make_inputs(rng, case)
    ours, reference = compiled(case)
    poison = lambda x: jnp.where(pad[None, :, None, None], jnp.nan, x)
    clean = lambda x: jnp.where(pad[None, :, None, None], 0.0, x)
    got = ours(*map(poison, (q, k, v, cot)), *layout)
    want = reference(*map(clean, (q, k, v, cot)), *layout)
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        x = np.asarray(x)
        assert np.isfinite(x).all(), f"{name}: an invisible tile was read"
        assert (x[:, pad] == 0).all(), name
        assert rel_err(x, ref) <= TOL[case.dtype], name


# ----------------------------------------------------------------------------- lowering, blocks


@pytest.mark.parametrize("device_kind", ["TPU v5 lite", "TPU v6 lite"])
def test_lowers_to_mosaic_with_legal_blocks(device_kind):
    """Lowering for TPU runs Mosaic's block-shape checks (last two dims full or (8, 128)-aligned)."""
    b, t, h, hkv, d = 2, 1000, 4, 2, 64
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, pos, seg):
        blocks = BlockSizes(block_q=256, block_k=512, block_q_dq=128, block_k_dq=256,
                            block_q_dkv=256, block_k_dkv=128)
        out = segment_attention_tpu(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                    kv_segment_ids=seg, blocks=blocks)
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    chip = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                  abstract_device=chip)):
        text = grad.trace(q, kv, kv, ids, ids).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3
    for name in ("segment_attention_tpu_fwd", "segment_attention_tpu_dq",
                 "segment_attention_tpu_dkv"):
        assert name in text


def test_rejects_blocks_that_are_not_lane_multiples():
    x = jnp.zeros((1, 300, 1, 16))
    pos = jnp.zeros((1, 300), jnp.int32)
    with pytest.raises(ValueError, match="multiples of 128"):
        segment_attention_tpu(x, x, x, q_positions=pos, kv_positions=pos,
                              blocks=BlockSizes(block_q=128, block_k=64), interpret=True)
