"""KV-cache decoding for the dense Llama, and the per-layer pieces SUBLLM's decoder reuses.

A :class:`DecodeCache` holds one key/value buffer per layer and, per *cache group*, the positions of
the cached tokens and a per-sequence length pointer. The dense model has one group (every layer
caches every token); SUBLLM (:mod:`tokensparse.subllm.decode`) has one group per subsampler, whose
layers cache only the tokens that subsampler kept. Buffers are compact: slot ``j < length`` holds
the group's j-th kept token, slots past the pointer are never attended.

``prefill`` runs the prompt (right-padded; ``lengths`` tokens per row are real) and fills the
caches; ``decode_step`` runs one token per sequence at its own position. Keys are stored after RoPE,
so a cached token never needs its position again except for the causal mask.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from tokensparse.attention import attention
from tokensparse.llama import DecoderBlock, Llama


class DecodeCache(NamedTuple):
    """Per-layer K/V buffers [B, S_g, kv_heads, head_dim] and per-group positions [B, S_g] and
    lengths [B] (group g's layers all cache the same tokens)."""

    keys: tuple[Array, ...]
    values: tuple[Array, ...]
    positions: tuple[Array, ...]
    lengths: tuple[Array, ...]

    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(int(x.size) * x.dtype.itemsize for x in self.keys + self.values)


def occupied_bytes(cache: DecodeCache, layer_groups: tuple[int, ...]) -> Array:
    """Bytes of keys and values actually holding tokens (summed over the batch)."""
    total = jnp.zeros((), jnp.float32)
    for k, g in zip(cache.keys, layer_groups, strict=True):
        per_token = 2 * k.shape[2] * k.shape[3] * k.dtype.itemsize
        total = total + per_token * jnp.sum(cache.lengths[g]).astype(jnp.float32)
    return total


def block_prefill(block: DecoderBlock, x: Float[Array, "b n d"], positions: Int[Array, "b n"],
                  segment_ids: Int[Array, "b n"]):
    """``(block(x), k, v)``: the block's output and its rotated keys and values."""
    q, k, v = block.attn.project_qkv(block.input_norm(x), positions)
    out = block.attn.core(q, k, v, positions, segment_ids)
    return block.feed_forward(x + block.attn.project_out(out)), k, v


def compact(buffer: Array, values: Array, valid: Bool[Array, "b n"]) -> Array:
    """``buffer`` with the valid rows of ``values`` written, in order, to slots 0, 1, ... per row."""
    size = buffer.shape[1]
    slots = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, size)
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")


def write_slot(buffer: Array, values: Array, slot: Int[Array, " b"], write: Bool[Array, " b"]) -> Array:
    """``buffer[b, slot[b]] = values[b]`` where ``write[b]``; other rows are untouched."""
    size = buffer.shape[1]
    slot = jnp.where(write, slot, size)
    return buffer.at[jnp.arange(buffer.shape[0]), slot].set(values.astype(buffer.dtype), mode="drop")


def empty_buffers(block: DecoderBlock, batch: int, size: int, dtype):
    attn = block.attn
    shape = (batch, size, attn.n_kv_heads, attn.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def block_decode(
    block: DecoderBlock,
    x: Float[Array, "b 1 d"],
    position: Int[Array, "b 1"],
    k_cache: Array,
    v_cache: Array,
    kv_positions: Int[Array, "b s"],
    slot: Int[Array, " b"],
    write: Bool[Array, " b"],
):
    """One token through ``block`` against its cache: ``(y, k_cache, v_cache)``.

    The token's key/value go to ``slot`` where ``write``; it attends to slots ``<= slot`` (the cache
    plus itself). Rows with ``write=False`` compute garbage that the caller must discard.
    """
    q, k, v = block.attn.project_qkv(block.input_norm(x), position)
    k_cache = write_slot(k_cache, k[:, 0], slot, write)
    v_cache = write_slot(v_cache, v[:, 0], slot, write)
    visible = jnp.arange(k_cache.shape[1])[None, :] <= slot[:, None]
    out = attention(q, k_cache, v_cache, q_positions=position, kv_positions=kv_positions,
                    q_segment_ids=jnp.zeros(position.shape, jnp.int32),
                    kv_segment_ids=jnp.where(visible, 0, -1).astype(jnp.int32), causal=True,
                    backend="xla")
    h = x + block.attn.project_out(out)
    return block.feed_forward(h), k_cache, v_cache


def prompt_segments(lengths: Int[Array, " b"], width: int) -> Int[Array, "b t"]:
    """Segment ids of right-padded prompts: 0 for the first ``lengths[b]`` tokens, -1 after."""
    return jnp.where(jnp.arange(width)[None, :] < lengths[:, None], 0, -1).astype(jnp.int32)


def last_rows(h: Float[Array, "b t d"], lengths: Int[Array, " b"]) -> Float[Array, "b d"]:
    """Row ``lengths[b] - 1`` of each sequence: the state that predicts its next token."""
    return jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]


def filled_cache(blocks, kv: list[tuple[Array, Array]], layer_groups: tuple[int, ...],
                 group_sizes: tuple[int, ...], group_positions: list[Array], group_valid: list[Array],
                 dtype) -> DecodeCache:
    """A cache holding, per layer, the valid rows of its prefill keys/values (compacted to slots
    0, 1, ...) in a buffer of its group's size, with the groups' positions and lengths."""
    b = group_valid[0].shape[0]
    keys, values = [], []
    for block, (k, v), g in zip(blocks, kv, layer_groups, strict=True):
        k_buf, v_buf = empty_buffers(block, b, group_sizes[g], dtype)
        keys.append(compact(k_buf, k, group_valid[g]))
        values.append(compact(v_buf, v, group_valid[g]))
    return DecodeCache(
        tuple(keys), tuple(values),
        tuple(compact(jnp.zeros((b, size), jnp.int32), pos, valid)
              for size, pos, valid in zip(group_sizes, group_positions, group_valid, strict=True)),
        tuple(jnp.sum(valid, axis=1, dtype=jnp.int32) for valid in group_valid))


def check_prompt(tokens: Array, lengths: Array, max_len: int) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, time], got shape {tokens.shape}.")
    if lengths.shape != tokens.shape[:1]:
        raise ValueError(f"lengths {lengths.shape} must hold one length per row of tokens {tokens.shape}.")
    if max_len < tokens.shape[1]:
        raise ValueError(f"max_len={max_len} is shorter than the prompt width {tokens.shape[1]}.")


def prefill(model: Llama, tokens: Int[Array, "b t"], lengths: Int[Array, " b"], max_len: int
            ) -> tuple[Float[Array, "b v"], DecodeCache]:
    """Run right-padded prompts through the dense model; logits at each row's last real token and
    a cache of ``max_len`` slots holding the prompt."""
    check_prompt(tokens, lengths, max_len)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = prompt_segments(lengths, t)
    kv = []
    h = model.embed(tokens)
    for block in model.layers:
        h, k, v = block_prefill(block, h, positions, segment_ids)
        kv.append((k, v))
    cache = filled_cache(model.layers, kv, (0,) * len(kv), (max_len,), [positions], [segment_ids >= 0],
                         model.config.compute_dtype)
    return model.head(last_rows(model.final_norm(h), lengths)), cache


def decode_step(model: Llama, cache: DecodeCache, tokens: Int[Array, " b"], positions: Int[Array, " b"]
                ) -> tuple[Float[Array, "b v"], DecodeCache]:
    """One new token per sequence (at ``positions``) through the dense model: next-token logits and
    the cache with the token appended."""
    slot = cache.lengths[0]
    write = jnp.ones(slot.shape, bool)
    pos = positions[:, None].astype(jnp.int32)
    kv_pos = write_slot(cache.positions[0], positions, slot, write)
    h = model.embed(tokens[:, None])
    keys, values = [], []
    for i, block in enumerate(model.layers):
        h, k, v = block_decode(block, h, pos, cache.keys[i], cache.values[i], kv_pos, slot, write)
        keys.append(k)
        values.append(v)
    cache = DecodeCache(tuple(keys), tuple(values), (kv_pos,), (slot + 1,))
    return model.head(model.final_norm(h))[:, 0], cache
