"""KV-cache decoding for the dense Llama, and the per-layer pieces SUBLLM's decoder reuses.

A :class:`DecodeCache` holds, per *cache group*, its layers' key/value buffers (stacked, so the
layer loop scans over them; head-major, so a decode step reads each head's keys contiguously), the
positions of the cached tokens and a per-sequence length pointer.
The dense model has one group (every layer caches every token); SUBLLM
(:mod:`tokensparse.subllm.decode`) has one group per subsampler, whose layers cache only the tokens
that subsampler kept. Buffers are compact: slot ``j < length`` holds the group's j-th kept token,
slots past the pointer are never attended.

``prefill`` runs the prompt (right-padded; ``lengths`` tokens per row are real) and fills the
caches; ``decode_step`` runs one token per sequence at its own position. Both run the model's own
layer loop and the block's own attention sub-layer (its ``kv_cache`` hook) with the block's own
attention backend, so prefill and decode compute attention the same way on every platform. Keys are
stored after RoPE, so a cached token never needs its position again except for the causal mask.

**Length-bounded decode.** A decode step attends only over the filled prefix of each cache, not
the whole allocated buffer, so its attention cost follows occupancy, which is what lets SUBLLM's
shorter inner caches save time: :func:`tokensparse.decode_attention.stacked_attention` slices the
layer's keys and values straight out of the group's stack, at the smallest of a few static lengths
that covers the longest filled prefix in the batch. The plain-JAX backends (``xla``,
``reference``, ``chunked``: what runs on a CPU) attend on that head-major slice directly; any
other backend (a kernel: Pallas on a GPU) runs itself on it, so prefill and decode compute
attention with the same kernel. Both are tested against the reference over the full buffer with
the mask hiding the unfilled slots.

**Past the end.** A cache of ``max_len`` slots holds ``max_len`` tokens. With a concrete cache
(eager calls) :func:`decode_step` raises when a row's cache is full. Under ``jit`` the lengths are
traced, so the step cannot raise: it writes nothing for such a row (the token is dropped, never
wrapped) and leaves ``lengths[0] > max_len``, which :func:`overflowed` reports after the step;
:class:`tokensparse.generate.Decoder` checks its (host) positions before each step instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tokensparse.attention import resolve
from tokensparse.decode_attention import stacked_attention
from tokensparse.layer_loop import Layer
from tokensparse.llama import Llama


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeCache:
    """Per cache group g: its layers' K/V buffers stacked head-major, ``[n_g, B, kv_heads, S_g,
    head_dim]`` (in layer order), the positions [B, S_g] and lengths [B] of the tokens it holds.
    ``layer_groups`` (static) gives each layer's group."""

    key_stacks: tuple[Array, ...]
    value_stacks: tuple[Array, ...]
    positions: tuple[Array, ...]
    lengths: tuple[Array, ...]
    layer_groups: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

    @property
    def keys(self) -> tuple[Array, ...]:
        """Each layer's key buffer [B, S_g, kv_heads, head_dim] (a copy, token-major)."""
        return tuple(jnp.swapaxes(self.key_stacks[g][j], 1, 2) for g, j in layer_slots(self.layer_groups))

    @property
    def values(self) -> tuple[Array, ...]:
        """Each layer's value buffer [B, S_g, kv_heads, head_dim] (a copy, token-major)."""
        return tuple(jnp.swapaxes(self.value_stacks[g][j], 1, 2)
                     for g, j in layer_slots(self.layer_groups))

    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(int(x.size) * x.dtype.itemsize for x in self.key_stacks + self.value_stacks)


def layer_slots(layer_groups: tuple[int, ...]) -> list[tuple[int, int]]:
    """(group, index within the group's stack) of every layer."""
    seen: dict[int, int] = {}
    out = []
    for g in layer_groups:
        out.append((g, seen.get(g, 0)))
        seen[g] = seen.get(g, 0) + 1
    return out


def occupied_bytes(cache: DecodeCache, layer_groups: tuple[int, ...]) -> Array:
    """Bytes of keys and values actually holding tokens (summed over the batch)."""
    total = jnp.zeros((), jnp.float32)
    for g, _ in layer_slots(layer_groups):
        k = cache.key_stacks[g]
        per_token = 2 * k.shape[2] * k.shape[4] * k.dtype.itemsize
        total = total + per_token * jnp.sum(cache.lengths[g]).astype(jnp.float32)
    return total


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


def prefill_layer(block, h, layer: Layer, selection):
    """A :meth:`~tokensparse.llama.Llama.run_layers` layer function that also returns the layer's
    rotated keys and values."""
    recorded = []

    def record(k, v):
        recorded.append((k, v))
        return k, v, None, None

    return block(h, layer.positions, layer.segment_ids, selection, kv_cache=record), recorded[0]


def overflowed(cache: DecodeCache) -> Array:
    """Per row: True when a decode step ran past the end of its full-length cache (under ``jit``
    such a step drops the token's keys and values instead of raising)."""
    return cache.lengths[0] > cache.positions[0].shape[1]


def check_room(cache: DecodeCache, where: str) -> None:
    """Raise when a row's full-length cache has no slot left for one more token. Only a concrete
    cache can be checked (eager calls); under ``jit`` see :func:`overflowed`."""
    lengths = cache.lengths[0]
    if isinstance(lengths, jax.core.Tracer):
        return
    size = cache.positions[0].shape[1]
    full = np.flatnonzero(np.asarray(lengths) >= size)
    if full.size:
        raise ValueError(f"{where}: rows {full.tolist()} already hold max_len={size} tokens; "
                         "decoding past the end of the cache needs a larger max_len.")


def decode_layer(slots: Int[Array, " l"], kv_positions: Int[Array, "b s"], slot: Int[Array, " b"],
                 write: Bool[Array, " b"]):
    """A layer function for one new token per row against a group's stacked caches (the loop
    carry ``(h, key_stack, value_stack)``; ``slots[layer]`` is the layer's place in the stack).

    The token's key/value go to ``slot`` where ``write``; it attends to slots ``<= slot`` (the cache
    plus itself), over the cache's filled prefix only (:func:`stacked_attention`). Rows with
    ``write=False`` compute garbage that the caller must discard."""
    visible = jnp.arange(kv_positions.shape[1])[None, :] <= slot[:, None]
    kv_segments = jnp.where(visible, 0, -1).astype(jnp.int32)

    def layer_fn(block, carry, layer: Layer, selection):
        h, key_stack, value_stack = carry
        j = slots[layer.index]
        stacks = {}

        def cache(k, v):  # hands the core the whole stacks; it reads layer j's filled prefix
            stacks["k"] = _write_layer_slot(key_stack, j, k[:, 0], slot, write)
            stacks["v"] = _write_layer_slot(value_stack, j, v[:, 0], slot, write)
            return stacks["k"], stacks["v"], kv_positions, kv_segments

        h, normed = block.attend_and_norm(h, layer.positions, jnp.zeros(layer.positions.shape, jnp.int32),
                                          selection, kv_cache=cache,
                                          core=_stacked_core(block.attn, j, slot + 1))
        h = block.feed_forward(h, normed)
        return (h, stacks["k"], stacks["v"]), None
    return layer_fn


PLAIN_JAX_BACKENDS = frozenset({"reference", "xla", "chunked"})
"""Attention backends written in plain JAX: decoding with them runs
:func:`~tokensparse.decode_attention.head_major_attention` (the same mathematics, without
transposing the cached keys); any other backend (a kernel) runs itself on the slice."""


def _stacked_core(attn, layer: Array, filled: Int[Array, " b"]):
    """An attention core whose keys and values are the group's whole head-major stacks: it attends
    to ``layer``'s buffer over its first ``max(filled)`` slots (:func:`stacked_attention`)."""

    def core(q, key_stack, value_stack, positions, segment_ids, kv_positions, kv_segment_ids):
        _, b, hkv, s, d = key_stack.shape
        kv = jax.ShapeDtypeStruct((b, s, hkv, d), key_stack.dtype)
        kernel = None if resolve(attn.backend, q, kv, kv) in PLAIN_JAX_BACKENDS else attn.core
        return stacked_attention(q, key_stack, value_stack, layer, q_positions=positions,
                                 kv_positions=kv_positions, kv_segment_ids=kv_segment_ids,
                                 filled=filled, core=kernel)
    return core


def _write_layer_slot(stack, j, values, slot, write):
    """``stack[j, b, :, slot[b]] = values[b]`` (values [B, kv_heads, head_dim]) where ``write[b]``,
    in place in a loop carry."""
    size = stack.shape[3]
    slot = jnp.where(write, slot, size)
    rows = jnp.arange(stack.shape[1])
    return stack.at[j, rows, :, slot].set(values.astype(stack.dtype), mode="drop")


def prompt_segments(lengths: Int[Array, " b"], width: int) -> Int[Array, "b t"]:
    """Segment ids of right-padded prompts: 0 for the first ``lengths[b]`` tokens, -1 after."""
    return jnp.where(jnp.arange(width)[None, :] < lengths[:, None], 0, -1).astype(jnp.int32)


def last_rows(h: Float[Array, "b t d"], lengths: Int[Array, " b"]) -> Float[Array, "b d"]:
    """Row ``lengths[b] - 1`` of each sequence: the state that predicts its next token."""
    return jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]


def filled_cache(kv: list[tuple[Array, Array]], layer_groups: tuple[int, ...],
                 group_sizes: tuple[int, ...], group_positions: list[Array], group_valid: list[Array],
                 dtype) -> DecodeCache:
    """A cache holding, per layer, the valid rows of its prefill keys/values (compacted to slots
    0, 1, ...) in a buffer of its group's size, with the groups' positions and lengths."""
    b = group_valid[0].shape[0]
    stacks: dict[str, list[list[Array]]] = {"k": [[] for _ in group_sizes],
                                            "v": [[] for _ in group_sizes]}
    for (k, v), g in zip(kv, layer_groups, strict=True):
        shape = (b, group_sizes[g], *k.shape[2:])
        stacks["k"][g].append(compact(jnp.zeros(shape, dtype), k, group_valid[g]))
        stacks["v"][g].append(compact(jnp.zeros(shape, dtype), v, group_valid[g]))
    def head_major(buffers):
        return jnp.stack([jnp.swapaxes(x, 1, 2) for x in buffers])

    return DecodeCache(
        tuple(head_major(x) for x in stacks["k"]), tuple(head_major(x) for x in stacks["v"]),
        tuple(compact(jnp.zeros((b, size), jnp.int32), pos, valid)
              for size, pos, valid in zip(group_sizes, group_positions, group_valid, strict=True)),
        tuple(jnp.sum(valid, axis=1, dtype=jnp.int32) for valid in group_valid),
        tuple(layer_groups))


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
    hidden, _, kv = model.hidden_states(tokens, positions, segment_ids, layer_fn=prefill_layer)
    cache = filled_cache(kv, (0,) * len(kv), (max_len,), [positions], [segment_ids >= 0],
                         model.config.compute_dtype)
    return model.head(last_rows(hidden, lengths)), cache


def decode_step(model: Llama, cache: DecodeCache, tokens: Int[Array, " b"], positions: Int[Array, " b"]
                ) -> tuple[Float[Array, "b v"], DecodeCache]:
    """One new token per sequence (at ``positions``) through the dense model: next-token logits and
    the cache with the token appended. Raises when a row's cache is full and the cache is concrete;
    under ``jit`` the token is dropped and :func:`overflowed` says so (module doc)."""
    check_room(cache, "decode_step")
    slot = cache.lengths[0]
    write = jnp.ones(slot.shape, bool)
    kv_pos = write_slot(cache.positions[0], positions, slot, write)
    slots = jnp.arange(len(model.layers), dtype=jnp.int32)
    layer_fn = decode_layer(slots, kv_pos, slot, write)
    hidden, (keys, values), _ = model.hidden_states(
        tokens[:, None], positions[:, None].astype(jnp.int32), layer_fn=layer_fn,
        carry=(cache.key_stacks[0], cache.value_stacks[0]))
    cache = DecodeCache((keys,), (values,), (kv_pos,), (slot + 1,), cache.layer_groups)
    return model.head(hidden)[:, 0], cache
