"""Decode-step attention over the filled prefix of a layer's buffer in a stacked KV cache.

A decode step's queries (one new token per row) attend to a cache buffer of which only a prefix is
filled. :func:`stacked_attention` reads only that prefix: it picks the smallest of a few static
lengths (:func:`bucket_sizes`: eighths of the buffer, rounded up to 16) that covers the longest
filled prefix in the batch and runs one ``lax.switch`` branch per length, each slicing the layer's
keys and values straight out of the group's ``[layers, B, kv_heads, S, head_dim]`` stack (one
``dynamic_slice``; the stack itself is never copied). The per-token attention cost follows
occupancy within an eighth of the buffer, which is what lets SUBLLM's shorter inner caches save
time.

Two ways to attend on the slice:

- :func:`head_major_attention` (``core=None``), plain JAX on the head-major slice: what the
  plain-JAX backends (``xla``, ``reference``, ``chunked``) decode with. Handing their token-major
  code the slice would transpose it first, and slicing the layer out of the stack before the
  switch made XLA copy the whole buffer every layer and token: on a CPU both cost more than the
  attention itself.
- an attention ``core`` (a kernel backend, e.g. Pallas on a GPU), called on the token-major view of
  the slice, so that prefill and decode compute attention with the same kernel.

Masks follow the library's one rule (``kernels_pallas.reference.attention_mask``): a query at
position p sees cached slots whose position is ``<= p`` and whose segment id is 0 (the decode
queries' segment); unfilled slots carry segment -1. A query that sees nothing returns zeros.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from kernels_pallas.reference import attention_mask, masked_softmax

DECODE_BUCKETS = 8
"""How many static key lengths a decode step chooses between (see :func:`bucket_sizes`)."""
BUCKET_MULTIPLE = 16
"""Bucket lengths are rounded up to a multiple of this (attention kernel tiles)."""


def bucket_sizes(size: int, buckets: int = DECODE_BUCKETS, multiple: int = BUCKET_MULTIPLE
                 ) -> tuple[int, ...]:
    """The static key lengths a decode step over a ``size``-slot buffer may attend over:
    ``ceil(size·i/buckets)`` for i = 1..buckets, rounded up to ``multiple``, capped at ``size``."""
    out: list[int] = []
    for i in range(1, buckets + 1):
        n = min(size, math.ceil(math.ceil(size * i / buckets) / multiple) * multiple)
        if not out or n > out[-1]:
            out.append(n)
    return tuple(out)


def head_major_attention(
    q: Float[Array, "b tq h d"],
    k: Float[Array, "b hkv s d"],
    v: Float[Array, "b hkv s d"],
    *,
    q_positions: Int[Array, "b tq"],
    kv_positions: Int[Array, "b s"],
    kv_segment_ids: Int[Array, "b s"],
) -> Float[Array, "b tq h d"]:
    """Causal grouped-query attention of ``q`` (segment 0) over head-major keys and values in
    float32: the ``reference`` backend's mathematics (its ``masked_softmax``), without transposing
    the keys."""
    b, tq, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    # b tq hkv g d → b hkv (g tq) d: each kv head's queries as the rows of one matrix.
    qg = jnp.moveaxis(q.reshape(b, tq, hkv, g, d), 1, 3).reshape(b, hkv, g * tq, d)
    qg = qg.astype(jnp.float32) * (1.0 / math.sqrt(d))
    q_pos = jnp.tile(q_positions, (1, g))  # row r: query r % tq
    mask = attention_mask(q_pos, kv_positions, jnp.zeros(q_pos.shape, jnp.int32), kv_segment_ids)
    probs = masked_softmax(jnp.einsum("bkrd,bksd->bkrs", qg, k.astype(jnp.float32)), mask[:, None])
    out = jnp.einsum("bkrs,bksd->bkrd", probs, v.astype(jnp.float32))
    out = jnp.moveaxis(out.reshape(b, hkv, g, tq, d), 3, 1)  # b tq hkv g d
    return out.reshape(b, tq, h, d).astype(q.dtype)


def stacked_attention(
    q: Float[Array, "b tq h d"],
    key_stack: Float[Array, "n b hkv s d"],
    value_stack: Float[Array, "n b hkv s d"],
    layer: Int[Array, ""],
    *,
    q_positions: Int[Array, "b tq"],
    kv_positions: Int[Array, "b s"],
    kv_segment_ids: Int[Array, "b s"],
    filled: Int[Array, " b"],
    core: Callable | None = None,
    buckets: int = DECODE_BUCKETS,
    multiple: int = BUCKET_MULTIPLE,
) -> Float[Array, "b tq h d"]:
    """Attention of ``q`` (segment 0) over ``key_stack[layer]`` / ``value_stack[layer]``, reading
    only the first ``n`` slots, ``n`` the smallest of :func:`bucket_sizes` that is at least
    ``max(filled)``. Slots at or past ``filled[b]`` must already be hidden by ``kv_segment_ids``
    (-1): cutting them changes nothing. ``core`` (:meth:`~tokensparse.llama.Attention.core`'s
    signature) attends on the token-major slice; None: :func:`head_major_attention`."""
    b, _, _, d = q.shape
    hkv, size = key_stack.shape[2], key_stack.shape[3]
    sizes = bucket_sizes(size, buckets, multiple)

    def branch(n):
        k, v = (jax.lax.dynamic_slice(x, (layer, 0, 0, 0, 0), (1, b, hkv, n, d))[0]
                for x in (key_stack, value_stack))
        kv_pos, kv_seg = kv_positions[:, :n], kv_segment_ids[:, :n]
        if core is None:
            return head_major_attention(q, k, v, q_positions=q_positions, kv_positions=kv_pos,
                                        kv_segment_ids=kv_seg)
        return core(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), q_positions,
                    jnp.zeros(q_positions.shape, jnp.int32), kv_pos, kv_seg)

    if len(sizes) == 1:
        return branch(sizes[0])
    index = jnp.searchsorted(jnp.asarray(sizes, jnp.int32), jnp.max(filled).astype(jnp.int32))
    return jax.lax.switch(jnp.minimum(index, len(sizes) - 1),
                          [lambda n=n: branch(n) for n in sizes])
