"""The mechanics of the one loop over decoder layers (:meth:`tokensparse.llama.Llama.run_layers`).

Layers are split into *segments*: maximal runs of equal ``kinds``, cut where the
:class:`~tokensparse.layer_stack.LayerStack`'s groups end. A segment of several layers runs under
one ``lax.scan`` over its group's stacked variables (a single layer runs inline); ``scan=False``
runs every segment as a Python loop over the same per-layer function. RNG streams the layers
advance (LoRA dropout) are written back into the stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Int

from tokensparse.layer_stack import LayerStack, runs, slice_state, unstacked_state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Layer:
    """What a per-layer hook sees of the layer it runs."""

    index: Array  # the layer's index in the model (traced under a scan)
    positions: Int[Array, "b t"]
    segment_ids: Int[Array, "b t"] | None
    inputs: Any  # this layer's entry of ``run_layers(inputs=...)`` (None without)
    kind: Hashable = dataclasses.field(default=None, metadata=dict(static=True))


def residual(carry):
    """The residual stream of a loop carry (``h`` or ``(h, *extra)``)."""
    return carry[0] if isinstance(carry, tuple) else carry


def with_residual(carry, h):
    """``carry`` with its residual stream replaced by ``h``."""
    return (h, *carry[1:]) if isinstance(carry, tuple) else h


def run(stack: LayerStack, body: Callable, carry, positions, segment_ids=None, *,
        kinds: Sequence[Hashable] | None = None, inputs: Sequence[Any] | None = None,
        start: int = 0, stop: int | None = None, scan: bool = True):
    """``carry, y = body(block, carry, layer)`` for layers ``start..stop-1`` of ``stack``:
    ``(carry, outputs)``, ``outputs`` the per-layer ``y`` (None when all are None)."""
    n = len(stack)
    stop = n if stop is None else stop
    if not 0 <= start <= stop <= n:
        raise ValueError(f"layers {start}..{stop} out of range for {n} layers.")
    kinds = (None,) * n if kinds is None else tuple(kinds)
    if len(kinds) != n or (inputs is not None and len(inputs) != n):
        raise ValueError(f"kinds and inputs need one entry per layer ({n}).")
    outputs = []
    for a, b in segments(stack, kinds, start, stop):
        layer_inputs = None if inputs is None else inputs[a:b]
        carry, ys = _run_segment(stack, a, b, body, carry, positions, segment_ids, kinds[a],
                                 layer_inputs, scan)
        outputs.extend(None if ys is None else jax.tree.map(lambda y, j=j: y[j], ys)
                       for j in range(b - a))
    return carry, None if all(y is None for y in outputs) else outputs


def segments(stack: LayerStack, kinds, start: int, stop: int) -> list[tuple[int, int]]:
    """Runs of equal kinds in ``start..stop-1``, cut at group boundaries."""
    cuts = set(stack.starts)
    out = []
    for a, b in runs(kinds[start:stop]):
        bounds = sorted({a + start, b + start} | {c for c in cuts if a + start < c < b + start})
        out.extend(zip(bounds[:-1], bounds[1:], strict=True))
    return out


def _run_segment(stack, a, b, body, carry, positions, segment_ids, kind, inputs, scan):
    g, lo = stack.locate(a)
    group = stack.groups[g]
    graphdef, state = nnx.split(group)
    # A part of a group is sliced, which copies its weights: callers group to their runs.
    stacked = state if (lo, b - a) == (0, stack.sizes[g]) else slice_state(state, lo, lo + b - a)
    stacked_inputs = None if inputs is None or all(x is None for x in inputs) else \
        jax.tree.map(lambda *xs: jnp.stack(xs), *inputs)

    def step(carry, xs):
        layer_state, index, layer_inputs = xs
        block = nnx.merge(graphdef, unstacked_state(layer_state))
        # Tie positions and segment ids to the iteration: otherwise XLA hoists everything derived
        # from them alone (attention masks of every tile) out of the loop and keeps it alive.
        pos, seg, _ = jax.lax.optimization_barrier((positions, segment_ids, index))
        carry, y = body(block, carry, Layer(index, pos, seg, layer_inputs, kind))
        return carry, (y, nnx.state(block, nnx.RngState))

    indices = jnp.arange(a, b, dtype=jnp.int32)
    if scan and b - a > 1:
        carry, (ys, rng) = jax.lax.scan(step, carry, (stacked, indices, stacked_inputs))
    else:
        per_layer = []
        for j in range(b - a):
            carry, out = step(carry, jax.tree.map(lambda x, j=j: x[j],
                                                  (stacked, indices, stacked_inputs)))
            per_layer.append(out)
        ys, rng = jax.tree.map(lambda *o: jnp.stack(o), *per_layer)
    _write_back_rng(group, rng, lo, b - a)
    return carry, ys


def _write_back_rng(group: nnx.Module, rng: nnx.State, start: int, size: int) -> None:
    """Store the RNG streams the layers advanced (LoRA dropout) back into the stacked group."""
    new = jax.tree.leaves(rng)
    if not new:
        return
    current = nnx.state(group, nnx.RngState)
    leaves, treedef = jax.tree.flatten(current)
    full = leaves[0].shape[0] == size and start == 0
    updated = [n if full else c.at[start:start + size].set(n) for c, n in zip(leaves, new,
                                                                              strict=True)]
    nnx.update(group, jax.tree.unflatten(treedef, updated))

