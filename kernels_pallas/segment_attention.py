"""Flash attention masked by original positions and segment ids, as Pallas kernels with a custom_vjp.

The mask is :func:`kernels_pallas.reference.visible`: a query at position p sees a key at position
p' iff p' <= p (when causal) and both carry the same segment id >= 0. This serves packed
documents, compacted token subsets (a Selection keeps positions ascending, so causal order survives
compaction) and padded slots (segment id < 0, whose output row is exactly zero).

Tiles are skipped from per-tile position and segment ranges computed outside the kernel: for each
query tile the wrapper finds the span of key tiles that can be visible (``lo..hi``) and inside it the
first run of fully visible tiles (``flo..fhi``), which run without building a mask. With ascending
positions this reproduces the usual causal skip; with sorted segments, the block-diagonal skip.

Layout is ``[B, T, H, D]`` for queries and ``[B, T, Hkv, D]`` for keys and values (GQA, H % Hkv == 0).
Softmax statistics are kept in fp32 in base 2; the forward saves the per-row logsumexp for the
backward, which runs as two kernels (dq over query tiles; dk/dv over key tiles, summing the query
heads of a group inside the kernel). Lowering: Triton (GPU) or ``interpret=True`` (any platform,
used by the CPU tests). The Mosaic (TPU) variant is ``segment_attention_tpu``; both share the tile
schedule, padding and argument checks of ``tile_schedule``, and the mask rule and
:class:`~kernels_pallas.reference.BlockSizes` of ``reference``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from kernels_pallas import tile_schedule as ts
from kernels_pallas.reference import BlockSizes, visible
from kernels_pallas.tile_schedule import EMPTY_LSE as _EMPTY_LSE
from kernels_pallas.tile_schedule import LOG2E as _LOG2E
from kernels_pallas.tile_schedule import M_INIT as _M_INIT


@dataclasses.dataclass(frozen=True)
class Config:
    """Static kernel parameters (hashable: it is a non-differentiable argument of the custom_vjp)."""

    blocks: BlockSizes = BlockSizes()  # every size set (the wrapper fits them)
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2
    interpret: bool = False
    causal: bool = True
    use_segments: bool = True
    scale: float = 1.0
    exact_fp32: bool = True


# ----------------------------------------------------------------------------- kernel bodies


def _dot(a, b, cfg: Config, *, trans_a: bool = False, trans_b: bool = False):
    """a @ b (optionally transposed) with fp32 accumulation; exact fp32 products for fp32 inputs."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 and cfg.exact_fp32 else None
    dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _masked(s, q_pos, q_seg, kv_pos, kv_seg, cfg: Config):
    """Logits ``s`` of a (query tile, key tile) pair, -inf where the rule of ``reference`` hides the
    key (only the ids the rule reads are used)."""
    segs = (q_seg[:, None], kv_seg[None, :]) if cfg.use_segments else (None, None)
    mask = visible(q_pos[:, None], kv_pos[None, :], *segs, causal=cfg.causal)
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _three_loops(sched_ref, body, carry):
    """Run ``body(j, carry, masked)`` over [lo, flo) masked, [flo, fhi) unmasked, [fhi, hi) masked."""
    lo, flo, fhi, hi = sched_ref[0], sched_ref[1], sched_ref[2], sched_ref[3]
    carry = lax.fori_loop(lo, flo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(flo, fhi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(fhi, hi, functools.partial(body, masked=True), carry)


def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                o_ref, lse_ref, *, cfg: Config):
    block_q, d = q_ref.shape
    block_k = cfg.blocks.block_k
    q = q_ref[...]
    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    scale = cfg.scale * _LOG2E

    def body(j, carry, masked):
        acc, m, denom = carry
        kv = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[kv, :]
        s = _dot(q, k, cfg, trans_b=True) * scale
        if masked:
            s = _masked(s, q_pos, q_seg, kpos_ref[kv], kseg_ref[kv], cfg)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        denom = denom * alpha + jnp.sum(p, axis=1)
        v = v_ref[kv, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, cfg)
        return acc, m_new, denom

    carry = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), _M_INIT, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    acc, m, denom = _three_loops(sched_ref, body, carry)
    seen = denom > 0
    o_ref[...] = (acc / jnp.where(seen, denom, 1.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, denom, 1.0)), _EMPTY_LSE)


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
               do_ref, lse_ref, delta_ref, dq_ref, *, cfg: Config):
    block_q, d = q_ref.shape
    block_k = cfg.blocks.block_k_dq
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos, q_seg = qpos_ref[...], qseg_ref[...]
    scale = cfg.scale * _LOG2E

    def body(j, dq, masked):
        kv = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k = k_ref[kv, :]
        s = _dot(q, k, cfg, trans_b=True) * scale
        if masked:
            s = _masked(s, q_pos, q_seg, kpos_ref[kv], kseg_ref[kv], cfg)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(do, v_ref[kv, :], cfg, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, cfg)

    dq = _three_loops(sched_ref, body, jnp.zeros((block_q, d), jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(sched_ref, q_ref, k_ref, v_ref, qpos_ref, qseg_ref, kpos_ref, kseg_ref,
                do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: Config):
    block_k, d = k_ref.shape
    groups = q_ref.shape[1]  # query heads sharing this kv head
    block_q = cfg.blocks.block_q_dkv
    k, v = k_ref[...], v_ref[...]
    kv_pos, kv_seg = kpos_ref[...], kseg_ref[...]
    scale = cfg.scale * _LOG2E

    def head(g, carry):
        def body(i, carry, masked):
            dk, dv = carry
            rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            s = _dot(q, k, cfg, trans_b=True) * scale
            if masked:
                s = _masked(s, qpos_ref[rows], qseg_ref[rows], kv_pos, kv_seg, cfg)
            p = jnp.exp2(s - lse_ref[g, rows][:, None])
            dv = dv + _dot(p.astype(do.dtype), do, cfg, trans_a=True)
            dp = _dot(do, v, cfg, trans_b=True)
            ds = p * (dp - delta_ref[g, rows][:, None])
            dk = dk + _dot(ds.astype(q.dtype), q, cfg, trans_a=True)
            return dk, dv

        return _three_loops(sched_ref, body, carry)

    zeros = jnp.zeros((block_k, d), jnp.float32)
    dk, dv = lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ----------------------------------------------------------------------------- pallas_calls


def _compiler_params(cfg: Config, d: int, backward: bool):
    warps = cfg.num_warps_bwd if backward else cfg.num_warps
    if warps is None:
        warps = 4 if d <= 64 else 8
    stages = cfg.num_stages_bwd if backward else cfg.num_stages
    return plgpu.CompilerParams(num_warps=warps, num_stages=stages)


def _fwd_call(q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched, cfg: Config):
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    bq = cfg.blocks.block_q
    nq = tq // bq
    # Query tiles in reverse order: under a causal mask the last tiles do the most work.
    tile = lambda i: nq - 1 - i
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda i, bi, hi: (bi, tile(i), 0)),
            pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, tile(i), hi, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, tile(i))),
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, tile(i))),
            pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, 0)),
            pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, tile(i), hi, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, tile(i))),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        compiler_params=_compiler_params(cfg, d, backward=False),
        interpret=cfg.interpret,
        name="segment_attention_fwd",
    )(sched, q, k, v, q_pos, q_seg, kv_pos, kv_seg)


def _dq_call(q, k, v, q_pos, q_seg, kv_pos, kv_seg, do, lse, delta, sched, cfg: Config):
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    bq = cfg.blocks.block_q_dq
    nq = tq // bq
    tile = lambda i: nq - 1 - i
    q_tile = pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, tile(i), hi, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, tile(i)))
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda i, bi, hi: (bi, tile(i), 0)),
            q_tile,
            pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, tk, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, tile(i))),
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, tile(i))),
            pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, 0)),
            pl.BlockSpec((None, tk), lambda i, bi, hi: (bi, 0)),
            q_tile,
            row_tile,
            row_tile,
        ],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, d, backward=True),
        interpret=cfg.interpret,
        name="segment_attention_dq",
    )(sched, q, k, v, q_pos, q_seg, kv_pos, kv_seg, do, lse, delta)


def _dkv_call(q, k, v, q_pos, q_seg, kv_pos, kv_seg, do, lse, delta, sched, cfg: Config):
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    bk = cfg.blocks.block_k_dkv
    nk = tk // bk
    kv_tile = pl.BlockSpec((None, bk, None, d), lambda j, bi, hi: (bi, j, hi, 0))
    # All query rows of the g query heads that share kv head hi: [Tq, g, D] and [g, Tq].
    q_group = pl.BlockSpec((None, tq, g, d), lambda j, bi, hi: (bi, 0, hi, 0))
    row_group = pl.BlockSpec((None, g, tq), lambda j, bi, hi: (bi, hi, 0))
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid=(nk, b, hkv),
        in_specs=[
            pl.BlockSpec((None, None, 4), lambda j, bi, hi: (bi, j, 0)),
            q_group,
            kv_tile,
            kv_tile,
            pl.BlockSpec((None, tq), lambda j, bi, hi: (bi, 0)),
            pl.BlockSpec((None, tq), lambda j, bi, hi: (bi, 0)),
            pl.BlockSpec((None, bk), lambda j, bi, hi: (bi, j)),
            pl.BlockSpec((None, bk), lambda j, bi, hi: (bi, j)),
            q_group,
            row_group,
            row_group,
        ],
        out_specs=[kv_tile, kv_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, d, backward=True),
        interpret=cfg.interpret,
        name="segment_attention_dkv",
    )(sched, q, k, v, q_pos, q_seg, kv_pos, kv_seg, do, lse, delta)


# ----------------------------------------------------------------------------- custom_vjp


@functools.partial(jax.custom_vjp, nondiff_argnums=(10,))
def _flash(q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_fwd, sched_dq, sched_dkv, cfg):
    out, _ = _fwd_call(q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_fwd, cfg)
    return out


def _flash_fwd(q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_fwd, sched_dq, sched_dkv, cfg):
    out, lse = _fwd_call(q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_fwd, cfg)
    res = (q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_dq, sched_dkv, out, lse)
    return out, res


def _flash_bwd(cfg, res, do):
    q, k, v, q_pos, q_seg, kv_pos, kv_seg, sched_dq, sched_dkv, out, lse = res
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = jnp.swapaxes(delta, 1, 2)  # [B, H, Tq], like lse
    args = (q, k, v, q_pos, q_seg, kv_pos, kv_seg, do, lse, delta)
    dq = _dq_call(*args, sched_dq, cfg)
    dk, dv = _dkv_call(*args, sched_dkv, cfg)
    return dq, dk, dv, None, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- public wrapper


def default_config(head_dim: int, dtype) -> dict:
    """Keyword arguments of :func:`segment_attention` for this head dim and dtype: ``blocks`` and
    the launch parameters.

    16-bit inputs with head dims up to 128 use 128x128 forward tiles with 8 warps; the backward uses
    64x64 tiles with 4 warps. Larger head dims and fp32 halve the tiles to stay within shared memory.
    """
    half = jnp.dtype(dtype).itemsize <= 2
    width = head_dim * (1 if half else 2)  # bytes per row / 2
    if width <= 128:
        fwd, bwd = (128, 128) if half else (64, 64), 64
    else:
        fwd, bwd = (64, 64), 32
    blocks = BlockSizes(block_q=fwd[0], block_k=fwd[1], block_q_dq=bwd, block_k_dq=bwd,
                        block_q_dkv=bwd, block_k_dkv=bwd)
    return dict(blocks=blocks, num_warps=8 if head_dim > 64 else 4, num_stages=2, num_warps_bwd=4,
                num_stages_bwd=2)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _clamp(block: int, length: int) -> int:
    """A power-of-two block no larger than needed for ``length`` rows, and at least 16 (Triton dots)."""
    return max(16, min(_next_pow2(block), _next_pow2(length)))


def segment_attention(
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
    num_warps: int | None = None,
    num_stages: int = 2,
    num_warps_bwd: int | None = None,
    num_stages_bwd: int = 2,
    interpret: bool = False,
) -> Float[Array, "b tq h d"]:
    """Flash attention under the mask rule of ``kernels_pallas.reference``; differentiable.

    ``blocks`` (default ``BlockSizes()``: 64x64 everywhere) are rounded to powers of two of at least
    16 and at most what the sequence needs. Lengths need not be multiples of the blocks: rows are
    padded with segment -1 inside. A head dim that is not a power of two is zero-padded.
    """
    ts.check_inputs(q, k, v, "segment_attention")
    tq, d, tk = q.shape[1], q.shape[3], k.shape[1]
    scale = ts.resolve_scale(scale, d)
    blocks = blocks or BlockSizes()
    q_sizes = tuple(_clamp(x, tq) for x in blocks.q_sizes)
    k_sizes = tuple(_clamp(x, tk) for x in blocks.k_sizes)
    blocks = BlockSizes.from_sizes(q_sizes, k_sizes)
    tq_pad, tk_pad = ts.round_up(tq, max(q_sizes)), ts.round_up(tk, max(k_sizes))
    padded = tq_pad != tq or tk_pad != tk
    use_segments = padded or q_segment_ids is not None or kv_segment_ids is not None
    cfg = Config(blocks=blocks, num_warps=num_warps, num_stages=num_stages,
                 num_warps_bwd=num_warps_bwd, num_stages_bwd=num_stages_bwd, interpret=interpret,
                 causal=causal, use_segments=use_segments, scale=scale)

    q_pos, q_seg, kv_pos, kv_seg = ts.padded_layout(q_positions, kv_positions, q_segment_ids,
                                                     kv_segment_ids, tq_pad, tk_pad)
    sched_fwd, sched_dq, sched_dkv = ts.schedules(
        q_pos, q_seg, kv_pos, kv_seg, fwd=blocks.fwd, dq=blocks.dq, dkv=blocks.dkv, causal=causal)

    d_pad = max(16, _next_pow2(d))
    qp, kp, vp = (jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, d_pad - d)))
                  for x, n in ((q, tq_pad), (k, tk_pad), (v, tk_pad)))
    out = _flash(qp, kp, vp, q_pos, q_seg, kv_pos, kv_seg, sched_fwd, sched_dq, sched_dkv, cfg)
    return out[:, :tq, :, :d]
