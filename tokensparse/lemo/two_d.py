"""Jenga's two-dimensional sparsity (a paper extension): shifted sparse attention on the kept tokens.

Token elimination makes a sparse layer attend over its K kept tokens only (the *compacted*
sequence). Two-dimensional sparsity adds LongLoRA's shifted sparse attention (S²-Attn) on top:
the compacted sequence is cut into ``groups`` groups of ``g = ceil(K / groups)`` consecutive kept
tokens (1/8 of the kept length by default), and each query attends only to keys of its own group.
Heads ``[H // 2, H)`` (LongLoRA's second half) use groups shifted by ``g // 2``, so information
crosses group boundaries from one layer to the next. Attention then costs about ``K² / groups``
instead of ``K²`` per head. Training uses it; evaluation stays dense.

Masks follow the library's one rule (positions and segment ids, never array indices), so causal
order, packed documents (segment ids) and padding slots (segment id < 0) compose with the groups
unchanged: a query sees a key iff both are in the same group, the same document, and the key's
original position is not later.

**Where the shift wraps.** LongLoRA rolls the shifted heads by half a group, so its last group holds
the sequence's last ``g - g//2`` tokens together with its first ``g//2``; with index-based causal
masking the first tokens then see the last ones (a future leak). Here the masks come from original
positions, so nothing can leak, but the end of the sequence would still see its start. We do not
wrap: the first ``g // 2`` tokens and the last ``g - g//2`` tokens of the shifted heads are two
groups of their own. The implementation still rolls (every group then has exactly ``g`` rows, so
the shifted heads cost no more than the others) and keeps the two parts of the wrapped group apart
with segment ids.

**How it runs.** :func:`shifted_sparse_attention` has the signature of
:meth:`tokensparse.llama.Attention.core`. Each head half is reshaped (after the roll, for the
shifted half) into ``[B * groups, g, heads, D]`` and handed to the model's attention backend, which
then computes only the diagonal group blocks: the saving is visible in the compiled FLOPs on every
backend (chunked, Pallas, XLA), not only where a kernel skips masked tiles. GQA: when the head split
falls on a KV-group boundary each half takes its own KV heads; otherwise each half gets a copy of the
KV head of each of its query heads. :func:`reference_shifted_sparse_attention` is the dense
definition (one [T, T] mask per head) the tests compare against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tokensparse.attention import attention, attention_mask

GROUPS = 8


def group_size(length: int, groups: int = GROUPS) -> int:
    """Rows per group for a compacted sequence of ``length`` kept tokens: ``ceil(length / groups)``."""
    if groups < 1:
        raise ValueError(f"two-dimensional sparsity needs groups >= 1, got {groups}.")
    return max(1, math.ceil(length / groups))


def shifted_heads(n_heads: int) -> tuple[int, int]:
    """The query heads ``[start, n_heads)`` that use shifted groups (LongLoRA's second half)."""
    return n_heads // 2, n_heads


def group_ids(length: int, groups: int = GROUPS, *, shifted: bool) -> np.ndarray:
    """Each compacted row's group, ``[length]``: ``i // g``, or with the shift ``(i + g - g//2) // g``
    (the first ``g // 2`` rows form group 0, then whole groups; the tail is a group of its own)."""
    g = group_size(length, groups)
    i = np.arange(length)
    return (i + g - g // 2) // g if shifted else i // g


def reference_shifted_sparse_attention(q, k, v, positions, segment_ids=None, *,
                                       groups: int = GROUPS) -> Float[Array, "b t h d"]:
    """The dense definition: per-head masked [T, T] attention, fp32 softmax, empty rows zero.

    Head ``h`` sees key ``j`` from query ``i`` iff the library's mask rule allows it and
    ``group_ids(shifted=h >= H // 2)`` agree on ``i`` and ``j``."""
    b, t, n_heads, head_dim = q.shape
    rep = n_heads // k.shape[2]
    base = attention_mask(positions, positions, segment_ids, segment_ids, causal=True)
    first_shifted = shifted_heads(n_heads)[0]
    same = [group_ids(t, groups, shifted=h >= first_shifted) for h in range(n_heads)]
    same = jnp.asarray(np.stack([g[:, None] == g[None, :] for g in same]))  # [H, T, T]
    mask = base[:, None] & same[None]
    kh = jnp.repeat(k, rep, axis=2).astype(jnp.float32)
    vh = jnp.repeat(v, rep, axis=2).astype(jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kh) / math.sqrt(head_dim)
    logits = jnp.where(mask, logits, -jnp.inf)
    visible = jnp.any(mask, axis=-1, keepdims=True)
    probs = jnp.where(visible, jax.nn.softmax(jnp.where(visible, logits, 0.0), axis=-1), 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, vh)
    return out.astype(q.dtype)


def shifted_sparse_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hkv d"],
    v: Float[Array, "b t hkv d"],
    positions: Int[Array, "b t"],
    segment_ids: Int[Array, "b t"] | None = None,
    kv_positions=None,
    kv_segment_ids=None,
    *,
    backend: str = "auto",
    groups: int = GROUPS,
) -> Float[Array, "b t h d"]:
    """Shifted sparse attention over a (compacted) sequence; :meth:`Attention.core`'s signature.

    Equals :func:`reference_shifted_sparse_attention`; ``backend`` runs each group (see the module
    docstring). Self-attention only: a KV cache (``kv_positions``) is refused, since decoding and
    evaluation are dense."""
    if kv_positions is not None or kv_segment_ids is not None:
        raise ValueError("two-dimensional sparsity is a training-time self-attention; it takes no "
                         "KV cache (evaluate and decode dense).")
    b, t, n_heads, _ = q.shape
    n_kv = k.shape[2]
    if n_heads % n_kv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of kv heads ({n_kv}).")
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    g = group_size(t, groups)
    padded = g * math.ceil(t / g)
    q, k, v = (_pad(x, padded, 0) for x in (q, k, v))
    pos, seg = _pad(positions, padded, 0), _pad(seg, padded, -1)
    split = shifted_heads(n_heads)[0]
    outs = []
    for lo, hi, shift in ((0, split, 0), (split, n_heads, g // 2)):
        if lo == hi:
            continue
        kp, vp = _kv_for_heads(k, lo, hi, n_heads), _kv_for_heads(v, lo, hi, n_heads)
        outs.append(_grouped_attention(q[:, :, lo:hi], kp, vp, pos, seg, g, shift, backend))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return out[:, :t]


def _pad(x, length: int, value):
    extra = length - x.shape[1]
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _kv_for_heads(kv, lo: int, hi: int, n_heads: int):
    """The KV heads that query heads ``lo..hi-1`` read, laid out for GQA within the slice."""
    rep = n_heads // kv.shape[2]
    if lo % rep == 0 and hi % rep == 0:
        return kv[:, :, lo // rep:hi // rep]
    return jnp.take(kv, jnp.arange(lo, hi) // rep, axis=2)  # one KV head per query head


def _grouped_attention(q, k, v, pos, seg, g: int, shift: int, backend: str):
    """Attention within consecutive ``g``-row groups of the sequence rolled left by ``shift``."""
    b, t = pos.shape
    if shift:
        q, k, v, pos, seg = (jnp.roll(x, -shift, axis=1) for x in (q, k, v, pos, seg))
        # The first ``shift`` rows wrapped to the end: a group of their own, apart from the tail.
        wrapped = jnp.arange(t) >= t - shift
        seg = jnp.where(seg >= 0, 2 * seg + wrapped.astype(jnp.int32), -1)

    def grouped(x):
        return x.reshape(b * (t // g), g, *x.shape[2:])

    out = attention(grouped(q), grouped(k), grouped(v), q_positions=grouped(pos),
                    kv_positions=grouped(pos), q_segment_ids=grouped(seg),
                    kv_segment_ids=grouped(seg), causal=True, backend=backend)
    out = out.reshape(b, t, *out.shape[2:])
    return jnp.roll(out, shift, axis=1) if shift else out


def two_d_core(attn, groups: int = GROUPS):
    """:func:`shifted_sparse_attention` on ``attn``'s backend, as a ``core=`` hook of
    :meth:`tokensparse.llama.DecoderBlock.attend_and_norm`."""

    def core(q, k, v, positions, segment_ids=None, kv_positions=None, kv_segment_ids=None):
        return shifted_sparse_attention(q, k, v, positions, segment_ids, kv_positions,
                                        kv_segment_ids, backend=attn.backend, groups=groups)
    return core
