"""Flash attention masked by positions and segment ids: the Mosaic (TPU) lowering.

Same contract as :func:`kernels_pallas.segment_attention.segment_attention` (the mask rule and
``BlockSizes`` of ``reference``, GQA, padding slots with all-zero output rows, fp32 base-2
statistics, logsumexp saved for the backward) and the same ``tile_schedule``. What differs is the
mapping onto a TPU core, whose blocks must have their last two dims full or multiples of (8, 128):

- Layout: q as ``[B, H, Tq, D]``, k/v as ``[B, Hkv, Tk, D]``, so every data block is ``(rows, D)``.
  Query-side ids are replicated over 128 lanes (``[B, Tq, 128]``), key-side ids over 8 sublanes
  (``[B, 8, Tk]``), so the mask needs no in-kernel transpose (as in jax's TPU flash/splash kernels).
- Grid ``(b, h, q tile, kv tile)``, kv axis sequential: running max, sum and accumulator live in
  VMEM scratch. The ``[lo, flo, fhi, hi]`` schedule is scalar-prefetched into SMEM; steps outside
  ``[lo, hi)`` do nothing and their index_map clamps the kv block into ``[lo, hi - 1]`` (no new
  DMA); steps in ``[flo, fhi)`` skip the mask.
- Backward: dq on the forward's grid; dk/dv on ``(b, hkv, kv tile, group head, q tile)`` with the
  last two axes sequential, so a GQA group's query heads are summed in fp32 VMEM scratch instead of
  writing a per-query-head ``[B, H, Tk, D]`` gradient to HBM.
- Blocks are multiples of 128 or one tile covering the whole sublane-rounded sequence (16 rows for
  16-bit dtypes, else 8). Each call's schedule takes ``16 * B * T / block`` bytes of SMEM.

``interpret=True`` (or a ``pltpu.InterpretParams``) runs the kernels under the TPU interpreter (the
CPU tests); they also lower to Mosaic on a CPU-only machine, which checks the block shapes. Not yet
run on TPU hardware: Mosaic's layout passes and the default block sizes are unverified there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from kernels_pallas import tile_schedule as ts
from kernels_pallas.reference import BlockSizes, visible

_LANES = 128
_SUBLANES = 8
_NN = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel parameters (hashable: it is a non-differentiable argument of the custom_vjp)."""

    blocks: BlockSizes = BlockSizes(128, 128)  # every size set (the wrapper fits them)
    interpret: bool | pltpu.InterpretParams = False
    causal: bool = True
    use_segments: bool = True
    scale: float = 1.0
    exact_fp32: bool = True


# ----------------------------------------------------------------------------- kernel pieces


def _dot(a, b, dims, cfg: Config):
    """Matmul with fp32 accumulation; exact fp32 products (Mosaic fp32 contract) for fp32 inputs."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 and cfg.exact_fp32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _lanes(x: Array, n: int) -> Array:
    """A lane-replicated ``[rows, 128]`` value as ``[rows, n]``: whole-vreg tiling, then trimming."""
    reps = -(-n // _LANES)
    if reps > 1:
        x = jnp.tile(x, (1, reps))
    return x if x.shape[1] == n else x[:, :n]


def _mask(qpos_ref, qseg_ref, kpos_ref, kseg_ref, cfg: Config, block_k: int):
    """``[block_q, block_k]`` visibility from the query column and key row id blocks (the rule of
    ``reference``; only the ids the rule reads are loaded)."""
    segs = (_lanes(qseg_ref[...], block_k), kseg_ref[:1, :]) if cfg.use_segments else (None, None)
    pos = (_lanes(qpos_ref[...], block_k), kpos_ref[:1, :]) if cfg.causal else (None, None)
    return visible(*pos, *segs, causal=cfg.causal)


def _scores(q, k, ids, cfg: Config, masked: bool):
    """Base-2 logits of one tile pair; masked entries are -inf."""
    s = _dot(q, k, _NT, cfg) * (cfg.scale * ts.LOG2E)
    mask = _mask(*ids, cfg, k.shape[0]) if masked else None  # None: nothing to mask
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _schedule(sched_ref, row):
    """(lo, flo, fhi, hi) of one schedule row from the flat prefetched array."""
    return tuple(sched_ref[4 * row + c] for c in range(4))


def _clamped(sched_ref, row, t):
    """The tile a step at ``t`` loads: ``t`` inside ``[lo, hi)``, else the nearest end (no new DMA)."""
    lo, hi = sched_ref[4 * row], sched_ref[4 * row + 3]
    return jnp.minimum(jnp.maximum(t, lo), jnp.maximum(hi - 1, lo))


def _visit(t, row_sched, step):
    """Runs ``step(masked)`` for tile ``t`` when it may be visible; unmasked when it is fully visible."""
    lo, flo, fhi, hi = row_sched
    full = (t >= flo) & (t < fhi)  # [flo, fhi) lies inside [lo, hi)
    pl.when(full)(functools.partial(step, False))
    pl.when((t >= lo) & (t < hi) & ~full)(functools.partial(step, True))


# ----------------------------------------------------------------------------- kernels


def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                o_ref, lse_ref, m_scr, l_scr, acc_scr, *, cfg: Config, nq: int, nk: int):
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    ids = (qpos_ref, qseg_ref, kpos_ref, kseg_ref)
    block_k, d = k_ref.shape

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, ts.M_INIT, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def step(masked):
        s = _scores(q_ref[...], k_ref[...], ids, cfg, masked)
        m_prev = m_scr[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        alpha = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - _lanes(m_next, block_k))
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scr[...] = m_next
        v = v_ref[...]
        acc_scr[...] = acc_scr[...] * _lanes(alpha, d) + _dot(p.astype(v.dtype), v, _NN, cfg)

    _visit(j, _schedule(sched_ref, bi * nq + i), step)

    @pl.when(j == nk - 1)
    def _finish():
        denom = l_scr[...]
        seen = denom > 0
        safe = jnp.where(seen, denom, 1.0)
        o_ref[...] = (acc_scr[...] / _lanes(safe, d)).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log2(safe), ts.EMPTY_LSE)


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
               do_ref, lse_ref, delta_ref, dq_ref, dq_scr, *, cfg: Config, nq: int, nk: int):
    bi, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    ids = (qpos_ref, qseg_ref, kpos_ref, kseg_ref)
    block_k = k_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def step(masked):
        k = k_ref[...]
        s = _scores(q_ref[...], k, ids, cfg, masked)
        p = jnp.exp2(s - _lanes(lse_ref[...], block_k))
        dp = _dot(do_ref[...], v_ref[...], _NT, cfg)
        ds = p * (dp - _lanes(delta_ref[...], block_k))
        dq_scr[...] += _dot(ds.astype(k.dtype), k, _NN, cfg)

    _visit(j, _schedule(sched_ref, bi * nq + i), step)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, cfg: Config,
                groups: int, nq: int, nk: int):
    bi, j, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
    ids = (qpos_ref, qseg_ref, kpos_ref, kseg_ref)
    block_k = k_ref.shape[0]

    @pl.when((gi == 0) & (i == 0))
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def step(masked):
        q, do = q_ref[...], do_ref[...]
        s = _scores(q, k_ref[...], ids, cfg, masked)  # [block_q, block_k], as in the forward
        p = jnp.exp2(s - _lanes(lse_ref[...], block_k))
        dv_scr[...] += _dot(p.astype(do.dtype), do, _TN, cfg)
        dp = _dot(do, v_ref[...], _NT, cfg)
        ds = p * (dp - _lanes(delta_ref[...], block_k))
        dk_scr[...] += _dot(ds.astype(q.dtype), q, _TN, cfg)

    _visit(i, _schedule(sched_ref, bi * nk + j), step)

    @pl.when((gi == groups - 1) & (i == nq - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, sequential: int, name, cfg):
    semantics = ("parallel",) * (len(grid) - sequential) + ("arbitrary",) * sequential
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=pltpu.InterpretParams() if cfg.interpret is True else cfg.interpret,
        name=name,
    )


def _query_side_specs(bq: int, bk: int, d: int, g: int, nq: int):
    """Block specs on the (b, h, q tile, kv tile) grid: kv blocks follow the clamped schedule."""
    def kv_tile(bi, i, j, sched):
        return _clamped(sched, bi * nq + i, j)

    q_map = lambda bi, hi, i, j, sched: (bi, hi, i, 0)
    kv_map = lambda bi, hi, i, j, sched: (bi, hi // g, kv_tile(bi, i, j, sched), 0)
    qid_map = lambda bi, hi, i, j, sched: (bi, i, 0)
    kid_map = lambda bi, hi, i, j, sched: (bi, 0, kv_tile(bi, i, j, sched))
    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    row_spec = pl.BlockSpec((None, None, bq, _LANES), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_map)
    ids = [pl.BlockSpec((None, bq, _LANES), qid_map)] * 2 + \
        [pl.BlockSpec((None, _SUBLANES, bk), kid_map)] * 2
    return q_spec, row_spec, kv_spec, ids


def _fwd_call(q, k, v, ids, sched, cfg: Config):
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bq, bk = cfg.blocks.fwd
    nq, nk = tq // bq, tk // bk
    q_spec, row_spec, kv_spec, id_specs = _query_side_specs(bq, bk, d, h // hkv, nq)
    call = _call(
        functools.partial(_fwd_kernel, cfg=cfg, nq=nq, nk=nk), (b, h, nq, nk),
        [q_spec, kv_spec, kv_spec, *id_specs], [q_spec, row_spec],
        [jax.ShapeDtypeStruct(q.shape, q.dtype),
         jax.ShapeDtypeStruct((b, h, tq, _LANES), jnp.float32)],
        [pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
         pltpu.VMEM((bq, d), jnp.float32)],
        1, "segment_attention_tpu_fwd", cfg)
    out, lse = call(sched, q, k, v, *ids)
    return out, lse[..., 0]


def _dq_call(q, k, v, ids, do, lse, delta, sched, cfg: Config):
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bq, bk = cfg.blocks.dq
    nq, nk = tq // bq, tk // bk
    q_spec, row_spec, kv_spec, id_specs = _query_side_specs(bq, bk, d, h // hkv, nq)
    call = _call(
        functools.partial(_dq_kernel, cfg=cfg, nq=nq, nk=nk), (b, h, nq, nk),
        [q_spec, kv_spec, kv_spec, *id_specs, q_spec, row_spec, row_spec], q_spec,
        jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((bq, d), jnp.float32)],
        1, "segment_attention_tpu_dq", cfg)
    return call(sched, q, k, v, *ids, do, lse, delta)


def _dkv_call(q, k, v, ids, do, lse, delta, sched, cfg: Config):
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    bq, bk = cfg.blocks.dkv
    nq, nk = tq // bq, tk // bk

    def q_tile(bi, j, i, sched):
        return _clamped(sched, bi * nk + j, i)

    q_map = lambda bi, hk, j, gi, i, sched: (bi, hk * g + gi, q_tile(bi, j, i, sched), 0)
    kv_map = lambda bi, hk, j, gi, i, sched: (bi, hk, j, 0)
    q_spec = pl.BlockSpec((None, None, bq, d), q_map)
    row_spec = pl.BlockSpec((None, None, bq, _LANES), q_map)
    kv_spec = pl.BlockSpec((None, None, bk, d), kv_map)
    qid = pl.BlockSpec((None, bq, _LANES), lambda bi, hk, j, gi, i, s: (bi, q_tile(bi, j, i, s), 0))
    kid = pl.BlockSpec((None, _SUBLANES, bk), lambda bi, hk, j, gi, i, s: (bi, 0, j))
    call = _call(
        functools.partial(_dkv_kernel, cfg=cfg, groups=g, nq=nq, nk=nk), (b, hkv, nk, g, nq),
        [q_spec, kv_spec, kv_spec, qid, qid, kid, kid, q_spec, row_spec, row_spec],
        [kv_spec, kv_spec],
        [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        2, "segment_attention_tpu_dkv", cfg)
    return call(sched, q, k, v, *ids, do, lse, delta)


# ----------------------------------------------------------------------------- custom_vjp


def _lane_rows(x: Array) -> Array:
    """``[B, H, T]`` fp32 row statistics as the lane-replicated ``[B, H, T, 128]`` the kernels read."""
    return jnp.broadcast_to(x[..., None], (*x.shape, _LANES))


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _flash(q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_fwd, sched_dq, sched_dkv, cfg):
    out, _ = _fwd_call(q, k, v, (q_pos, q_seg, kv_pos, kv_seg), sched_fwd, cfg)
    return out


def _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_fwd, sched_dq, sched_dkv, cfg):
    out, lse = _fwd_call(q, k, v, (q_pos, q_seg, kv_pos, kv_seg), sched_fwd, cfg)
    return out, (q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_dq, sched_dkv, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_dq, sched_dkv, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    args = (q, k, v, (q_pos, q_seg, kv_pos, kv_seg), do, _lane_rows(lse), _lane_rows(delta))
    dq = _dq_call(*args, sched_dq, cfg)
    dk, dv = _dkv_call(*args, sched_dkv, cfg)
    return dq, dk, dv, None, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public wrapper


def default_config(head_dim: int, dtype) -> dict:
    """Keyword arguments of :func:`segment_attention_tpu` for this head dim and dtype: ``blocks``.

    The forward uses wide key tiles, as splash attention does (fewer grid steps, each with a fixed
    cost); the backward holds three [block_q, block_k] fp32 temporaries, so it stays at 256. fp32
    or head dims above 128 halve the key tile to stay well inside the default scoped VMEM.
    """
    wide = jnp.dtype(dtype).itemsize > 2 or head_dim > 128
    return dict(blocks=BlockSizes(block_q=256, block_k=256 if wide else 512, block_q_dq=256,
                                  block_k_dq=256, block_q_dkv=256, block_k_dkv=256))


def _fit(blocks: tuple[int, ...], length: int, sublane: int, name: str):
    """TPU-legal tile sizes for ``length`` rows and the padded length that all of them divide."""
    if min(blocks) < 1:
        raise ValueError(f"{name} sizes must be positive; got {blocks}.")
    if length <= min(blocks):  # one tile covers the sequence: legal as the full (padded) dim
        rows = ts.round_up(length, sublane)
        return (rows,) * len(blocks), rows
    if bad := [x for x in blocks if x % _LANES]:
        raise ValueError(f"{name} sizes {bad} must be multiples of {_LANES} on TPU (the lane width) "
                         f"when the sequence ({length}) spans more than one tile.")
    # No tile larger than the sequence needs (in power-of-two lane multiples, so that the usual
    # power-of-two blocks keep dividing each other and the padding stays below one largest tile).
    cap = _LANES << max(0, -(-length // _LANES) - 1).bit_length()
    blocks = tuple(min(x, cap) for x in blocks)
    return blocks, ts.round_up(length, math.lcm(*blocks))


def segment_attention_tpu(
    q: Float[Array, "b tq h d"],
    k: Float[Array, "b tk hkv d"],
    v: Float[Array, "b tk hkv d"],
    *,
    q_positions: Int[Array, "b tq"],
    kv_positions: Int[Array, "b tk"],
    q_segment_ids: Int[Array, "b tq"] | None = None,
    kv_segment_ids: Int[Array, "b tk"] | None = None,
    causal: bool = True,
    scale: float | None = None,
    blocks: BlockSizes | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> Float[Array, "b tq h d"]:
    """Flash attention under the mask rule of ``kernels_pallas.reference``, on TPU.

    ``blocks`` (default ``BlockSizes(128, 128)``) must be multiples of 128 unless one covers the
    whole sequence. Lengths need not be multiples of the blocks: rows are padded with segment -1
    inside. ``interpret`` selects the TPU interpreter (True: default ``InterpretParams``).
    """
    ts.check_inputs(q, k, v, "segment_attention_tpu")
    tq, d, tk = q.shape[1], q.shape[3], k.shape[1]
    scale = ts.resolve_scale(scale, d)
    sublane = _SUBLANES * max(1, 4 // q.dtype.itemsize)
    blocks = blocks or BlockSizes(128, 128)
    q_sizes, tq_pad = _fit(blocks.q_sizes, tq, sublane, "block_q")
    k_sizes, tk_pad = _fit(blocks.k_sizes, tk, sublane, "block_k")
    blocks = BlockSizes.from_sizes(q_sizes, k_sizes)
    padded = tq_pad != tq or tk_pad != tk
    use_segments = padded or q_segment_ids is not None or kv_segment_ids is not None
    cfg = Config(blocks=blocks, interpret=interpret, causal=causal, use_segments=use_segments,
                 scale=scale)

    q_pos, q_seg, kv_pos, kv_seg = ts.padded_layout(q_positions, kv_positions, q_segment_ids,
                                                     kv_segment_ids, tq_pad, tk_pad)
    scheds = ts.schedules(q_pos, q_seg, kv_pos, kv_seg, fwd=blocks.fwd, dq=blocks.dq,
                          dkv=blocks.dkv, causal=causal)
    scheds = tuple(s.reshape(-1) for s in scheds)  # 1-D in SMEM: higher ranks are padded per row
    columns = lambda x: jnp.broadcast_to(x[:, :, None], (*x.shape, _LANES))
    rows = lambda x: jnp.broadcast_to(x[:, None, :], (x.shape[0], _SUBLANES, x.shape[1]))

    qt, kt, vt = (jnp.swapaxes(ts.pad_rows(x, n, 0), 1, 2)
                  for x, n in ((q, tq_pad), (k, tk_pad), (v, tk_pad)))
    out = _flash(qt, kt, vt, columns(q_pos), columns(q_seg), rows(kv_pos), rows(kv_seg), *scheds,
                 cfg)
    return jnp.swapaxes(out, 1, 2)[:, :tq]
