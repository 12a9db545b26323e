"""Pallas segment attention vs the dense reference: forward, dq/dk/dv, masks, GQA, support checks.

On CPU the kernels run with ``interpret=True`` (compiled at XLA's lowest optimisation level: the
interpreted loops are slow to compile, fast to run); with TOKENSPARSE_TEST_PLATFORM=gpu the same tests
run the Triton lowering. Each case compiles once; layouts vary freely since they are data. Like
``kernels_pallas``, this module imports nothing from ``tokensparse`` (``test_kernels_standalone``
checks); the ``tokensparse`` dispatcher's use of the kernels is tested in ``test_backends``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kernels_pallas import register as R
from kernels_pallas.reference import BlockSizes, attention_mask, reference_attention
from kernels_pallas.segment_attention import segment_attention

INTERPRET = jax.default_backend() != "gpu"
_JIT = functools.partial(
    jax.jit, compiler_options={"xla_backend_optimization_level": 0} if INTERPRET else None)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    tq: int
    tk: int
    h: int
    hkv: int
    d: int
    causal: bool = True
    dtype: str = "float32"
    segments: bool = True
    blocks: tuple[tuple[str, int], ...] = (("block_q", 16), ("block_k", 16))
    b: int = 3


CASES = [
    Case("f32-gqa-causal", tq=40, tk=40, h=4, hkv=2, d=16),
    Case("f32-mqa-noncausal", tq=40, tk=40, h=4, hkv=1, d=32, causal=False,
         blocks=(("block_q", 16), ("block_k", 32))),
    # kv longer than q (prefix / decoding), ragged lengths, head_dim padded 24 -> 32, and backward
    # blocks that differ from the forward ones.
    Case("f32-mha-kv-longer", tq=24, tk=56, h=2, hkv=2, d=24,
         blocks=(("block_q", 16), ("block_k", 32), ("block_q_dq", 16), ("block_k_dq", 16),
                 ("block_q_dkv", 32), ("block_k_dkv", 16))),
    Case("bf16-gqa-causal", tq=48, tk=48, h=4, hkv=2, d=32, dtype="bfloat16"),
    Case("f32-dense-causal", tq=64, tk=64, h=2, hkv=1, d=16, segments=False, b=2),
]
TOL = {"float32": 1e-5, "bfloat16": 2e-2}


# ----------------------------------------------------------------------------- layouts


def make_layout(rng, case: Case):
    """Per batch row a different regime; queries are the last tq tokens of the kv sequence.

    Row 0: packed documents (positions restart, sorted segments) with trailing padding slots.
    Row 1: a compacted subset (ascending positions from range(4 tk)) with scattered padding slots.
    Row 2: unsorted random positions and segments, queries that may see no key at all.
    """
    b, tq, tk = case.b, case.tq, case.tk
    kv_pos = np.zeros((b, tk), np.int32)
    kv_seg = np.zeros((b, tk), np.int32)
    q_pos = np.zeros((b, tq), np.int32)
    q_seg = np.zeros((b, tq), np.int32)
    for row in range(b):
        if row % 3 == 0 and not case.segments:
            kv_pos[row] = np.arange(tk)
        elif row % 3 == 0:
            cuts = np.sort(rng.choice(np.arange(1, tk), size=2, replace=False))
            kv_seg[row] = np.searchsorted(cuts, np.arange(tk), side="right")
            starts = np.concatenate([[0], cuts])[kv_seg[row]]
            kv_pos[row] = np.arange(tk) - starts
            kv_seg[row, tk - rng.integers(1, 6):] = -1
        elif row % 3 == 1:
            kv_pos[row] = np.sort(rng.choice(4 * tk, size=tk, replace=False))
            if case.segments:
                kv_seg[row, rng.random(tk) < 0.2] = -1
        else:
            kv_pos[row] = rng.integers(tk // 2, 2 * tk, size=tk)
            kv_seg[row] = rng.integers(-1, 3, size=tk)
        q_pos[row] = kv_pos[row, tk - tq:]
        q_seg[row] = kv_seg[row, tk - tq:]
        if row % 3 == 2:
            q_pos[row] = rng.integers(0, 2 * tk, size=tq)
            q_seg[row] = rng.integers(-1, 4, size=tq)  # segment 3 has no keys
    if not case.segments:
        assert (kv_seg == 0).all() and (q_seg == 0).all()
    return tuple(jnp.asarray(x) for x in (q_pos, kv_pos, q_seg, kv_seg))


def make_inputs(rng, case: Case):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    q = normal(case.b, case.tq, case.h, case.d)
    k = normal(case.b, case.tk, case.hkv, case.d)
    v = normal(case.b, case.tk, case.hkv, case.d)
    cot = normal(case.b, case.tq, case.h, case.d)
    return q, k, v, cot


# ----------------------------------------------------------------------------- compiled pairs


@functools.cache
def compiled(case: Case):
    """(kernel, reference): each maps (q, k, v, cot, layout) to (out, dq, dk, dv)."""
    dtype = jnp.dtype(case.dtype)

    def run(attn, q, k, v, cot, q_pos, kv_pos, q_seg, kv_seg):
        if not case.segments:
            q_seg = kv_seg = None
        f = lambda q, k, v: attn(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                 q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=case.causal)
        out, vjp = jax.vjp(f, q, k, v)
        return (out, *vjp(cot.astype(out.dtype)))

    kernel = functools.partial(segment_attention, interpret=INTERPRET,
                               blocks=BlockSizes(**dict(case.blocks)))

    def ours(q, k, v, cot, *layout):
        return run(kernel, q.astype(dtype), k.astype(dtype), v.astype(dtype), cot, *layout)

    # The reference always runs in fp32 on the same (rounded) inputs: it is the truth.
    def reference(q, k, v, cot, *layout):
        q, k, v = (x.astype(dtype).astype(jnp.float32) for x in (q, k, v))
        return run(reference_attention, q, k, v, cot, *layout)

    return _JIT(ours), _JIT(reference)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def check_case(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    layout = make_layout(rng, case)
    q, k, v, cot = make_inputs(rng, case)
    ours, reference = compiled(case)
    return check_outputs(case, ours(q, k, v, cot, *layout), reference(q, k, v, cot, *layout),
                         layout, f"seed {seed}")


def check_outputs(case: Case, got, want, layout, what: str = "") -> int:
    """(out, dq, dk, dv) within tolerance of the reference, finite, in the case's dtype; rows with
    no visible key exactly zero in out and dq. Returns how many such rows there were."""
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert x.dtype == jnp.dtype(case.dtype), name
        assert np.isfinite(np.asarray(x, np.float32)).all(), name
        err = rel_err(x, ref)
        assert err <= TOL[case.dtype], f"{case.name} {what}: {name} rel err {err:.2e}"
    # Rows that see no key (padding slots included) are exactly zero, and so is their dq.
    mask = attention_mask(*layout, causal=case.causal) if case.segments else \
        attention_mask(layout[0], layout[1], causal=case.causal)
    empty = ~np.asarray(mask.any(-1))
    out, dq = np.asarray(got[0], np.float32), np.asarray(got[1], np.float32)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    return empty.sum()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_reference(case):
    empty_rows = sum(check_case(case, seed) for seed in range(3))
    if case.segments:
        assert empty_rows > 0  # the layouts do exercise rows with no visible key


@given(seed=st.integers(0, 2**32 - 1))
def test_random_layouts(seed):
    check_case(CASES[0], seed)


def test_dense_causal_tile_skipping_schedule():
    """Ascending positions: key tiles past the diagonal are skipped, those before run unmasked."""
    from kernels_pallas.tile_schedule import ranges as _ranges
    from kernels_pallas.tile_schedule import tile_visibility as _tile_visibility

    t, block = 64, 16
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    seg = jnp.zeros((1, t), jnp.int32)
    vis, full = _tile_visibility(pos, seg, pos, seg, block, block, causal=True)
    ranges = np.asarray(_ranges(vis, full))[0]
    # query tile i: visible key tiles [0, i], fully visible [0, i) -> only the diagonal is masked
    # (with no fully visible tile the unmasked run is empty, placed at hi).
    np.testing.assert_array_equal(ranges, [[0, 1, 1, 1], [0, 0, 1, 2], [0, 0, 2, 3], [0, 0, 3, 4]])
    # two packed documents of 32: the block-diagonal structure skips the other document.
    seg = (jnp.arange(t) >= 32).astype(jnp.int32)[None]
    pos = (jnp.arange(t) % 32).astype(jnp.int32)[None]
    vis, full = _tile_visibility(pos, seg, pos, seg, block, block, causal=True)
    ranges = np.asarray(_ranges(vis, full))[0]
    np.testing.assert_array_equal(ranges, [[0, 1, 1, 1], [0, 0, 1, 2], [2, 3, 3, 3], [2, 2, 3, 4]])


# ----------------------------------------------------------------------------- support checks


def _dispatch_inputs():
    case = Case("dispatch", tq=40, tk=40, h=4, hkv=2, d=16)
    rng = np.random.default_rng(7)
    q, k, v, _ = make_inputs(rng, case)
    return (q, k, v), make_layout(rng, case)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the pallas backend is supported")
def test_cpu_without_force_declines(monkeypatch):
    monkeypatch.delenv(R.INTERPRET_ENV, raising=False)
    qkv, _ = _dispatch_inputs()
    reason = R.supports(*qkv, causal=True)
    assert reason is not None and "cpu platform" in reason
    monkeypatch.setenv(R.INTERPRET_ENV, "1")
    assert R.supports(*qkv, causal=True) is None


@pytest.mark.skipif(INTERPRET, reason="needs a GPU")
def test_gpu_supported():
    qkv, _ = _dispatch_inputs()
    assert R.supports(*qkv, causal=True) is None
    bad = (qkv[0].astype(jnp.bfloat16), *qkv[1:])
    assert R.supports(*bad, causal=True) is not None
