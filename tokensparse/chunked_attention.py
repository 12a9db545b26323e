"""Memory-efficient attention in plain JAX: online softmax over key chunks, recomputed in backward.

The dense backends materialise [B, H, Tq, Tk] probabilities, which for long contexts dwarfs every
other activation (Llama-2-7B at 8K: 8 GiB per layer in fp32). This backend (``"chunked"``) never holds
more than one [B, H, Tq, chunk] tile: the forward scans key chunks with a running max and sum and saves
only the output and the per-row logsumexp; the backward (a ``custom_vjp``) rescans the chunks. It runs
on every platform, so compile-only memory on a CPU reflects what a flash kernel would use on a GPU.
Masks come from positions and segment ids exactly as in :mod:`tokensparse.attention`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _chunks(x, size):
    """[B, T, ...] → [T/size, B, size, ...] (T padded by the caller)."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _mask(q_pos, q_seg, k_pos, k_seg, causal):
    m = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg[:, :, None] >= 0) & (k_seg[:, None, :] >= 0)
    if causal:
        m &= k_pos[:, None, :] <= q_pos[:, :, None]
    return m[:, None, None]  # [b, 1, 1, tq, tk] against logits [b, hkv, g, tq, tk]


def _logits(q, k, scale):
    return jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attend(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, chunk):
    return _forward(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, chunk)[0]


def _forward(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, chunk):
    b, tq, hkv, g, d = q.shape

    def body(carry, kv):
        m, total, acc = carry
        kc, vc, pc, sc = kv
        s = _logits(q, kc, scale)
        mask = _mask(q_pos, q_seg, pc, sc, causal)
        m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1))
        safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(jnp.where(mask, s - safe[..., None], -jnp.inf))
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - safe, -jnp.inf))
        total = total * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("bkgqs,bskd->bkgqd", p, vc.astype(jnp.float32))
        return (m_new, total, acc), None

    init = (jnp.full((b, hkv, g, tq), -jnp.inf), jnp.zeros((b, hkv, g, tq)),
            jnp.zeros((b, hkv, g, tq, d)))
    (m, total, acc), _ = jax.lax.scan(body, init, tuple(_chunks(x, chunk) for x in (k, v, k_pos, k_seg)))
    visible = total > 0
    out = jnp.where(visible[..., None], acc / jnp.where(visible, total, 1.0)[..., None], 0.0)
    lse = jnp.where(visible, jnp.where(jnp.isfinite(m), m, 0.0) + jnp.log(jnp.where(visible, total, 1.0)),
                    jnp.inf)  # rows with no visible key: exp(s - inf) = 0 in backward
    out = jnp.moveaxis(out, 3, 1).astype(q.dtype)  # [b, tq, hkv, g, d]
    return out, (q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse)


def _fwd(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, chunk):
    return _forward(q, k, v, q_pos, q_seg, k_pos, k_seg, causal, scale, chunk)


def _bwd(causal, scale, chunk, res, d_out):
    q, k, v, q_pos, q_seg, k_pos, k_seg, out, lse = res
    do = jnp.moveaxis(d_out.astype(jnp.float32), 1, 3)  # [b, hkv, g, tq, d]
    delta = jnp.sum(do * jnp.moveaxis(out.astype(jnp.float32), 1, 3), axis=-1)  # [b, hkv, g, tq]
    qf = q.astype(jnp.float32)

    def body(dq, kv):
        kc, vc, pc, sc = kv
        s = _logits(q, kc, scale)
        mask = _mask(q_pos, q_seg, pc, sc, causal)
        p = jnp.exp(jnp.where(mask, s - lse[..., None], -jnp.inf))
        dv = jnp.einsum("bkgqs,bkgqd->bskd", p, do)
        dp = jnp.einsum("bkgqd,bskd->bkgqs", do, vc.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, kc.astype(jnp.float32))
        dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, qf)
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32),
                                tuple(_chunks(x, chunk) for x in (k, v, k_pos, k_seg)))

    def unchunk(x):
        return jnp.moveaxis(x, 0, 1).reshape(k.shape)

    zeros = [None] * 4
    return (dq.astype(q.dtype), unchunk(dk).astype(k.dtype), unchunk(dv).astype(v.dtype), *zeros)


_attend.defvjp(_fwd, _bwd)


def chunked_attention(q, k, v, *, q_positions, kv_positions, q_segment_ids=None, kv_segment_ids=None,
                      causal=True, scale=None, chunk: int = 512):
    """Same contract as :func:`tokensparse.attention.reference_attention`, O(Tq·chunk) memory."""
    b, tq, h, d = q.shape
    tk, hkv = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q_seg = jnp.zeros((b, tq), jnp.int32) if q_segment_ids is None else q_segment_ids
    k_seg = jnp.zeros((b, tk), jnp.int32) if kv_segment_ids is None else kv_segment_ids
    chunk = min(chunk, tk)
    pad = -tk % chunk
    if pad:  # padded keys carry segment -1: invisible
        k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (k, v))
        kv_positions = jnp.pad(kv_positions, ((0, 0), (0, pad)))
        k_seg = jnp.pad(k_seg, ((0, 0), (0, pad)), constant_values=-1)
    out = _attend(q.reshape(b, tq, hkv, h // hkv, d), k, v, q_positions, q_seg, kv_positions, k_seg,
                  causal, float(scale), chunk)
    return out.reshape(b, tq, h, d)
