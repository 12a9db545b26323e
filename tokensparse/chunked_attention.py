"""Memory-efficient attention in plain JAX: flash-style tiles with an online softmax, recomputed in
backward.

The dense backends materialise [B, H, Tq, Tk] probabilities, which for long contexts dwarfs every
other activation (Llama-2-7B at 8K: 8 GiB per layer in fp32). This backend (``"chunked"``) works on
[block_q, block_k] tiles: the forward maps over query blocks, each scanning key blocks with a running
max and sum, and saves only the output and the per-row logsumexp; the backward (a ``custom_vjp``)
maps over query blocks again, rescanning the key blocks, and accumulates dk, dv in place. Tiles whose
mask is empty (above the causal diagonal, other documents, padding) are skipped with ``lax.cond``:
causal attention does about half the work. Padding to whole tiles happens inside the custom_vjp, so
no padded copy of q, k or v is kept for the backward. It runs on every platform, so compile-only
memory on a CPU reflects what a flash kernel would use on a GPU. Masks come from positions and
segment ids by the one rule of ``kernels_pallas.reference.attention_mask``.

With the sequence split over a mesh's ``seq`` axis, each shard runs its own queries against the
gathered keys (a ``vmap`` over the pieces), so queries are never gathered. Under that ``vmap`` the
tile skip becomes a select: every tile of the shard is computed, masked (the dense backends do the
same); the zig-zag layout keeps the shards' useful work equal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.reference import attention_mask
from tokensparse.sharding import seq_pieces, seq_shards


def _pad_rows(x, multiple: int, value=0):
    pad = -x.shape[1] % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, size):
    """[B, T, ...] → [T/size, B, size, ...] (T a multiple of size)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _unblock(x):
    """Inverse of :func:`_blocks`."""
    n, b, size = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, n * size, *x.shape[3:])


def _mask(q_pos, q_seg, k_pos, k_seg, causal):
    """[b, tq, tk] visibility of a key tile to a query tile: :func:`attention_mask`'s rule."""
    return attention_mask(q_pos, k_pos, q_seg, k_seg, causal=causal)


def _logits(q, k, scale):
    return jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale


def _padded(q, k, v, q_pos, q_seg, k_pos, k_seg, bq, bk):
    """Pad queries to whole ``bq`` blocks and keys to whole ``bk`` blocks (padding: segment -1)."""
    q, q_pos, q_seg = _pad_rows(q, bq), _pad_rows(q_pos, bq), _pad_rows(q_seg, bq, -1)
    k, v, k_pos, k_seg = _pad_rows(k, bk), _pad_rows(v, bk), _pad_rows(k_pos, bk), _pad_rows(k_seg, bk, -1)
    return q, k, v, q_pos, q_seg, k_pos, k_seg


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attend(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, bq, bk):
    return _forward(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, bq, bk)[0]


def _grouped(x, hkv: int):
    """[b, t, h, d] → [b, t, hkv, h / hkv, d]: query heads grouped by the kv head they share."""
    b, t, h, d = x.shape
    return x.reshape(b, t, hkv, h // hkv, d)


def _forward(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, bq, bk):
    """Output [b, tq, h, d] and residuals. Queries come and go with ungrouped heads, so that the
    saved output is the very array the caller receives (a reshaped copy would be stored twice when
    layers run under a scan)."""
    tq = q.shape[1]
    qp, kp, vp, qpos, qseg, kpos, kseg = _padded(_grouped(q, k.shape[2]), k, v, q_pos, q_seg, k_pos,
                                                 k_seg, bq, bk)
    b, _, hkv, g, d = qp.shape
    keys = tuple(_blocks(x, bk) for x in (kp, vp, kpos, kseg))

    def query_block(args):
        qb, qpb, qsb = args

        def tile(carry, kv):
            m, total, acc = carry
            kc, vc, pc, sc = kv
            s = _logits(qb, kc, scale)
            mask = _mask(qpb, qsb, pc, sc, causal)[:, None, None]
            m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(jnp.where(mask, s - safe[..., None], -jnp.inf))
            alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
            total = total * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, vc.astype(jnp.float32))
            return m_new, total, acc

        def body(carry, kv):
            visible = jnp.any(_mask(qpb, qsb, kv[2], kv[3], causal))
            return jax.lax.cond(visible, tile, lambda c, _: c, carry, kv), None

        init = (jnp.full((b, hkv, g, bq), -jnp.inf), jnp.zeros((b, hkv, g, bq)),
                jnp.zeros((b, hkv, g, bq, d)))
        (m, total, acc), _ = jax.lax.scan(body, init, keys)
        visible = total > 0
        out = jnp.where(visible[..., None], acc / jnp.where(visible, total, 1.0)[..., None], 0.0)
        lse = jnp.where(visible, jnp.where(jnp.isfinite(m), m, 0.0)
                        + jnp.log(jnp.where(visible, total, 1.0)), jnp.inf)  # no visible key: p = 0
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), lse  # [b, bq, hkv, g, d], [b, hkv, g, bq]

    out, lse = jax.lax.map(query_block, tuple(_blocks(x, bq) for x in (qp, qpos, qseg)))
    out = _unblock(out)[:, :tq].reshape(q.shape)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, hkv, g, -1)[..., :tq]
    return out, (q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse)


def _fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, bq, bk):
    return _forward(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, bq, bk)


def _bwd(causal, scale, bq, bk, res, d_out):
    q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse = res
    q_shape = q.shape
    q, out, d_out = (_grouped(x, k.shape[2]) for x in (q, out, d_out))
    tq, tk = q.shape[1], k.shape[1]
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [b, tq, hkv, g]
    qp, kp, vp, qpos, qseg, kpos, kseg = _padded(q, k, v, q_pos, q_seg, k_pos, k_seg, bq, bk)
    do, delta = _pad_rows(d_out, bq), _pad_rows(delta, bq)
    lse = _pad_rows(jnp.moveaxis(lse, 3, 1), bq, jnp.inf)  # [b, tq, hkv, g]
    keys = tuple(_blocks(x, bk) for x in (kp, vp, kpos, kseg)) + (jnp.arange(kp.shape[1] // bk),)

    def query_block(dkv, args):
        qb, dob, lseb, deltab, qpb, qsb = args
        qf, dof = qb.astype(jnp.float32), jnp.moveaxis(dob.astype(jnp.float32), 1, 3)  # do: [b,k,g,q,d]
        lseb, deltab = jnp.moveaxis(lseb, 1, 3), jnp.moveaxis(deltab, 1, 3)  # [b, hkv, g, bq]

        def tile(carry, kv):
            dq, dk_all, dv_all = carry
            kc, vc, pc, sc, j = kv
            s = _logits(qb, kc, scale)
            mask = _mask(qpb, qsb, pc, sc, causal)[:, None, None]
            p = jnp.exp(jnp.where(mask, s - lseb[..., None], -jnp.inf))
            dp = jnp.einsum("bkgqd,bskd->bkgqs", dof, vc.astype(jnp.float32))
            ds = p * (dp - deltab[..., None]) * scale
            dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kc.astype(jnp.float32))
            start = (0, j * bk, 0, 0)
            dk_c = jax.lax.dynamic_slice(dk_all, start, kc.shape)
            dv_c = jax.lax.dynamic_slice(dv_all, start, vc.shape)
            dk_all = jax.lax.dynamic_update_slice(
                dk_all, dk_c + jnp.einsum("bkgqs,bqkgd->bskd", ds, qf), start)
            dv_all = jax.lax.dynamic_update_slice(
                dv_all, dv_c + jnp.einsum("bkgqs,bkgqd->bskd", p, dof), start)
            return dq, dk_all, dv_all

        def body(carry, kv):
            visible = jnp.any(_mask(qpb, qsb, kv[2], kv[3], causal))
            return jax.lax.cond(visible, tile, lambda c, _: c, carry, kv), None

        (dq, *dkv), _ = jax.lax.scan(body, (jnp.zeros(qb.shape, jnp.float32), *dkv), keys)
        return tuple(dkv), dq.astype(q.dtype)

    zeros_kv = (jnp.zeros(kp.shape, jnp.float32), jnp.zeros(vp.shape, jnp.float32))
    (dk, dv), dq = jax.lax.scan(
        query_block, zeros_kv, tuple(_blocks(x, bq) for x in (qp, do, lse, delta, qpos, qseg)))
    dq = _unblock(dq)[:, :tq].reshape(q_shape)
    return (dq, dk[:, :tk].astype(k.dtype), dv[:, :tk].astype(v.dtype), None, None, None, None)


_attend.defvjp(_fwd, _bwd)


def chunked_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                      causal=True, scale=None, block_q: int = 512, block_k: int = 512):
    """Same contract as :func:`kernels_pallas.reference.reference_attention`, O(block_q·block_k) memory
    per tile. Blocks larger than the sequence shrink to it."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    q_seg = jnp.zeros((b, tq), jnp.int32) if q_segment_ids is None else q_segment_ids
    k_seg = jnp.zeros((b, tk), jnp.int32) if kv_segment_ids is None else kv_segment_ids
    shards = seq_shards()
    if shards > 1 and tq % shards == 0:
        # The sequence is split over the mesh's `seq` axis: each shard attends its own queries to the
        # (gathered) keys. Mapping over query blocks of the whole sequence would gather the queries
        # and compute every shard's attention on every device.
        def attend(qs, qp, qg):
            return _attend(qs, k, v, qp, qg, kv_positions, k_seg, causal, float(scale),
                           min(block_q, tq // shards), min(block_k, tk))

        out = jax.vmap(attend, in_axes=1, out_axes=1)(
            seq_pieces(q, shards, ("act_heads",)), seq_pieces(q_positions, shards),
            seq_pieces(q_seg, shards))
        return out.reshape(b, tq, h, d)
    return _attend(q, k, v, q_positions, q_seg, kv_positions, k_seg, causal, float(scale),
                   min(block_q, tq), min(block_k, tk))
