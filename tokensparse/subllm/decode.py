"""SUBLLM decoding with per-level KV caches (the official code's decoding scheme).

Cache groups: group 0 is the full-length stream (its layers cache every token); group ``j + 1``
belongs to subsampler ``j`` and its layers cache only the tokens that subsampler kept. A group's
size is its inference capacity, ``ceil(infer_capacity · size of the parent group)`` starting from
``max_len``, and :func:`prefill` caps its threshold selections at those sizes, so the caches after a
prefill plus decode steps equal those of one infer-mode forward over the whole sequence at
``max_len``: first-come overflow decides the same way in both.

Allocation follows the capacity: at ``infer_capacity=0.75`` the default 24-layer structure
``TTTTT(TTTTT(TTTT)TTTTT)TTTTT`` allocates (10 + 10·0.75 + 4·0.5625)/24 = 0.82 of the dense KV bytes,
and fills about (10 + 10·0.64 + 4·0.41)/24 = 0.75 of them at the spec's keep rates.

A decode step walks the structure as a tree. At a subsampler the new token's own score decides
(``s > θ_level`` and room in the cache); the inner region runs under ``lax.cond`` only when some sequence
in the batch keeps the token, and sequences that dropped it write nothing and keep their state
(upsampling returns ``x`` exactly at a dropped token, and so does the bypass). Every group's
attention runs over its filled prefix only (:mod:`tokensparse.decode`), so a level's
per-token cost follows its occupancy. A full inner cache is the capacity rule (first-come: the token
is dropped), not an error; a full root cache is, as in :func:`tokensparse.decode.decode_step`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from tokensparse import routing
from tokensparse.decode import (
    DecodeCache,
    check_prompt,
    check_room,
    decode_layer,
    filled_cache,
    last_rows,
    layer_slots,
    prefill_layer,
    prompt_segments,
    write_slot,
)
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import Structure


@dataclasses.dataclass(frozen=True)
class Region:
    """The ops between a ``(`` and its ``)`` (or the whole model for group 0), as a tree.

    ``items`` holds layer indices (int) and nested regions in execution order; ``group`` is the cache
    group (subsampler index + 1; 0 for the root) and ``parent`` the enclosing group.
    """

    group: int
    parent: int | None
    level: int
    items: tuple[int | Region, ...]

    @property
    def subsampler(self) -> int:
        return self.group - 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static decode layout: the region tree, each group's cache size and each layer's group."""

    root: Region
    group_sizes: tuple[int, ...]
    layer_groups: tuple[int, ...]


def region_tree(structure: Structure) -> Region:
    """The structure's ops as nested :class:`Region` s."""
    stack: list[tuple[int, int | None, int, list]] = [(0, None, 0, [])]
    for op in structure.ops:
        if op.kind == "layer":
            stack[-1][3].append(op.index)
        elif op.kind == "down":
            stack.append((op.index + 1, stack[-1][0], op.level, []))
        else:
            group, parent, level, items = stack.pop()
            stack[-1][3].append(Region(group, parent, level, tuple(items)))
    group, parent, level, items = stack.pop()
    return Region(group, parent, level, tuple(items))


def _regions(region: Region):
    yield region
    for item in region.items:
        if isinstance(item, Region):
            yield from _regions(item)


def parent_groups(structure: Structure) -> tuple[int, ...]:
    """For each subsampler, the cache group whose stream it scores (0: the full-length stream)."""
    regions = sorted(_regions(region_tree(structure)), key=lambda r: r.group)
    return tuple(r.parent for r in regions[1:])


def layout(model: SubLLM, max_len: int) -> Layout:
    """Cache sizes for sequences of up to ``max_len`` tokens."""
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be positive.")
    root = region_tree(model.structure)
    regions = sorted(_regions(root), key=lambda r: r.group)
    sizes = [max_len]
    for r in regions[1:]:  # groups are numbered in order of their "(": a parent precedes its children
        sizes.append(routing.capacity(sizes[r.parent], model.subllm_config.infer_capacity))
    layer_groups = [0] * model.config.n_layers
    for r in regions:
        for item in r.items:
            if not isinstance(item, Region):
                layer_groups[item] = r.group
    return Layout(root, tuple(sizes), tuple(layer_groups))


def prefill(model: SubLLM, tokens: Int[Array, "b t"], lengths: Int[Array, " b"], max_len: int
            ) -> tuple[Float[Array, "b v"], DecodeCache]:
    """Infer-mode forward over right-padded prompts that fills every group's cache.

    Returns the logits at each row's last real token and the cache (sized by :func:`layout`).
    """
    check_prompt(tokens, lengths, max_len)
    lay = layout(model, max_len)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    segment_ids = prompt_segments(lengths, t)
    h, aux = model.forward(tokens, positions, segment_ids, mode="infer",
                           capacities=lay.group_sizes[1:], layer_fn=prefill_layer)
    group_valid = [seg >= 0 for seg in [segment_ids, *aux["segment_ids"]]]
    cache = filled_cache(aux["layer_outputs"], lay.layer_groups, lay.group_sizes,
                         [positions, *aux["positions"]], group_valid, model.config.compute_dtype)
    return model.head(last_rows(h, lengths)), cache


def decode_step(model: SubLLM, cache: DecodeCache, tokens: Int[Array, " b"],
                positions: Int[Array, " b"]) -> tuple[Float[Array, "b v"], DecodeCache]:
    """One new token per sequence at its original ``positions``: next-token logits and the cache.

    Raises when a row's full-length cache is full and the cache is concrete; under ``jit`` the token
    is dropped and :func:`tokensparse.decode.overflowed` says so."""
    check_room(cache, "subllm decode_step")
    lay = layout(model, cache.positions[0].shape[1])
    state = {"keys": list(cache.key_stacks), "values": list(cache.value_stacks),
             "positions": list(cache.positions), "lengths": list(cache.lengths)}
    pos = positions.astype(jnp.int32)
    h, state = _run_region(model, lay, lay.root, model.embed(tokens[:, None]), pos, pos,
                           jnp.ones(pos.shape, bool), state)
    cache = DecodeCache(*(tuple(state[k]) for k in ("keys", "values", "positions", "lengths")),
                        cache.layer_groups)
    return model.head(model.final_norm(h))[:, 0], cache


def _run_region(model: SubLLM, lay: Layout, region: Region, h, pos, group_pos, write, state):
    """Append the token to ``region``'s group where ``write`` and run the region's items on it."""
    g = region.group
    slot = state["lengths"][g]
    state["positions"][g] = write_slot(state["positions"][g], group_pos, slot, write)
    state["lengths"][g] = slot + write.astype(slot.dtype)
    slots = jnp.asarray([j for _, j in layer_slots(lay.layer_groups)], jnp.int32)
    layer_fn = decode_layer(slots, state["positions"][g], slot, write)
    for item in _layer_runs(region.items):
        if isinstance(item, Region):
            h, state = _subsample(model, lay, item, h, pos, slot, write, state)
        else:
            (h, state["keys"][g], state["values"][g]), _ = model.run_layers(
                (h, state["keys"][g], state["values"][g]), group_pos[:, None], layer_fn=layer_fn,
                start=item[0], stop=item[1])
    return h, state


def _layer_runs(items):
    """A region's items with each run of consecutive layer indices replaced by ``(start, stop)``."""
    out: list = []
    for item in items:
        if isinstance(item, Region):
            out.append(item)
        elif out and isinstance(out[-1], tuple) and out[-1][1] == item:
            out[-1] = (out[-1][0], item + 1)
        else:
            out.append((item, item + 1))
    return out


def _subsample(model: SubLLM, lay: Layout, region: Region, x, pos, parent_slot, alive, state):
    """Score the token, run ``region`` where it is kept (skipped when no row keeps it), upsample and
    bypass. A dropped token comes out as ``x`` exactly and leaves the region's caches untouched."""
    cfg = model.subllm_config
    j, g = region.subsampler, region.group
    s = model.scorers[j](x)[:, 0]
    keep = alive & (s > cfg.level_threshold(region.level)) & (state["lengths"][g] < lay.group_sizes[g])
    w = jnp.where(keep, jnp.clip(s, 0.0, 1.0), 0.0)[:, None, None].astype(x.dtype)
    group_pos = parent_slot if cfg.level_positions == "parent" and region.level > 1 else pos

    # Only the caches of this region's groups go through the cond: the others (the root's, the
    # largest) would be copied in and out of it for nothing.
    groups = [r.group for r in _regions(region)]

    def inner(operand):
        h, part = operand
        h, st = _run_region(model, lay, region, h, pos, group_pos, keep, _merged(state, groups, part))
        return h, _picked(st, groups)

    y, part = jax.lax.cond(jnp.any(keep), inner, lambda operand: operand, (x, _picked(state, groups)))
    state = _merged(state, groups, part)
    u = jnp.where(keep[:, None, None], x + w * (y - x), x)
    return model.bypasses[j](x, u), state


def _picked(state: dict, groups: list[int]) -> dict:
    """The entries of ``groups`` from every per-group list in the decode ``state``."""
    return {k: [v[g] for g in groups] for k, v in state.items()}


def _merged(state: dict, groups: list[int], part: dict) -> dict:
    """``state`` with the entries of ``groups`` replaced by ``part`` (a :func:`_picked` dict)."""
    out = {k: list(v) for k, v in state.items()}
    for k, values in part.items():
        for g, value in zip(groups, values, strict=True):
            out[k][g] = value
    return out
