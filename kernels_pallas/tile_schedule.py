"""The lowering-independent half of the segment-attention kernels: tile schedule, padding, checks.

Both lowerings (Triton in ``segment_attention``, Mosaic in ``segment_attention_tpu``) skip key tiles
from the same per-tile position and segment ranges, pad rows the same way (padding slots get segment
-1, so they see and are seen by nothing) and validate arguments identically; keeping that here means
the two kernels cannot drift apart in what they compute, only in how.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Int

LOG2E = math.log2(math.e)
M_INIT = -1e30  # finite running max: a row with no visible key so far never computes inf - inf
EMPTY_LSE = 1e30  # logsumexp saved for a row with no visible key: exp2(s - lse) == 0 in the backward
_BIG = 2**31 - 1


def tile_stats(pos: Array, seg: Array, block: int):
    """Per tile: min/max position and segment over valid rows, and whether the tile is one segment."""
    b, t = pos.shape
    pos = pos.reshape(b, t // block, block)
    seg = seg.reshape(b, t // block, block)
    valid = seg >= 0
    pmin = jnp.min(jnp.where(valid, pos, _BIG), axis=-1)
    pmax = jnp.max(jnp.where(valid, pos, -_BIG), axis=-1)
    smin = jnp.min(jnp.where(valid, seg, _BIG), axis=-1)
    smax = jnp.max(jnp.where(valid, seg, -_BIG), axis=-1)
    uniform = jnp.all(valid, axis=-1) & (smin == smax)
    return pmin, pmax, smin, smax, uniform


def tile_visibility(q_pos, q_seg, kv_pos, kv_seg, block_q: int, block_k: int, causal: bool):
    """``visible[b, i, j]``: some key of tile j may be seen from query tile i; ``full``: all are."""
    qpmin, qpmax, qsmin, qsmax, quni = (x[:, :, None] for x in tile_stats(q_pos, q_seg, block_q))
    kpmin, kpmax, ksmin, ksmax, kuni = (x[:, None, :] for x in tile_stats(kv_pos, kv_seg, block_k))
    visible = (ksmin <= qsmax) & (qsmin <= ksmax)  # also False for an all-padding tile
    full = quni & kuni & (qsmin == ksmin)
    if causal:
        visible &= kpmin <= qpmax
        full &= kpmax <= qpmin
    return visible, full


def ranges(visible: Array, full: Array) -> Int[Array, "... 4"]:
    """Along the last axis: [lo, flo, fhi, hi]; tiles in [lo, hi) may be visible, [flo, fhi) all are.

    [flo, fhi) is the first contiguous run of fully visible tiles (empty at hi when there is none).
    """
    n = visible.shape[-1]
    idx = jnp.arange(n)
    any_vis = jnp.any(visible, axis=-1)
    lo = jnp.where(any_vis, jnp.argmax(visible, axis=-1), 0)
    hi = jnp.where(any_vis, n - jnp.argmax(visible[..., ::-1], axis=-1), 0)
    any_full = jnp.any(full, axis=-1)
    flo = jnp.argmax(full, axis=-1)
    after = ~full & (idx >= flo[..., None])
    fhi = jnp.where(jnp.any(after, axis=-1), jnp.argmax(after, axis=-1), n)
    flo = jnp.where(any_full, flo, hi)
    fhi = jnp.where(any_full, fhi, hi)
    return jnp.stack([lo, flo, fhi, hi], axis=-1).astype(jnp.int32)


def schedules(q_pos, q_seg, kv_pos, kv_seg, *, fwd: tuple[int, int], dq: tuple[int, int],
              dkv: tuple[int, int], causal: bool):
    """Loop ranges for the three kernels, each from its own (block_q, block_k).

    fwd and dq: ``[B, Tq/block_q, 4]`` over key tiles per query tile; dkv: ``[B, Tk/block_k, 4]`` over
    query tiles per key tile (the transposed visibility).
    """
    sched_fwd = ranges(*tile_visibility(q_pos, q_seg, kv_pos, kv_seg, *fwd, causal))
    sched_dq = ranges(*tile_visibility(q_pos, q_seg, kv_pos, kv_seg, *dq, causal))
    vis, full = tile_visibility(q_pos, q_seg, kv_pos, kv_seg, *dkv, causal)
    sched_dkv = ranges(jnp.swapaxes(vis, 1, 2), jnp.swapaxes(full, 1, 2))
    return sched_fwd, sched_dq, sched_dkv


def check_inputs(q: Array, k: Array, v: Array, name: str) -> None:
    """The shape and dtype contract shared by both lowerings (raised before any padding)."""
    h, hkv = q.shape[2], k.shape[2]
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or h % hkv:
        raise ValueError(f"{name} expects q [B,Tq,H,D], k/v [B,Tk,Hkv,D] with H % Hkv "
                         f"== 0; got {q.shape}, {k.shape}, {v.shape}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}.")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_rows(x: Array, length: int, value) -> Array:
    """Pads axis 1 (the sequence axis) to ``length`` with ``value``."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad, constant_values=value)


def padded_layout(q_positions, kv_positions, q_segment_ids, kv_segment_ids, tq_pad: int,
                  tk_pad: int):
    """int32 (q_pos, q_seg, kv_pos, kv_seg) padded to the tile multiples; padding rows get segment -1.

    Missing segment ids mean one segment (0) per row, so the causal rule alone decides visibility.
    """
    b, tq = q_positions.shape
    tk = kv_positions.shape[1]
    q_seg = jnp.zeros((b, tq), jnp.int32) if q_segment_ids is None else q_segment_ids
    kv_seg = jnp.zeros((b, tk), jnp.int32) if kv_segment_ids is None else kv_segment_ids
    return (pad_rows(q_positions.astype(jnp.int32), tq_pad, 0),
            pad_rows(q_seg.astype(jnp.int32), tq_pad, -1),
            pad_rows(kv_positions.astype(jnp.int32), tk_pad, 0),
            pad_rows(kv_seg.astype(jnp.int32), tk_pad, -1))
