"""Decoder layers stored stacked, so that runs of identical layers execute under one ``lax.scan``.

A :class:`LayerStack` holds the layers as *groups*: group g is one module of the layers' class whose
every variable carries a leading layer axis (logical axis ``"layers"``). A scan over a whole group
reads its parameters as the scan's ``xs`` (no copy, and autodiff saves no per-layer weight slices);
a run that covers part of a group slices it, which copies that part's weights, so pipelines that
know their runs in advance (LeMo's schedule, SUBLLM's structure) group the layers to match
(:meth:`LayerStack.regroup`).

Per-layer access converts: ``stack[i]`` is a *copy* of layer i as an ordinary module (reads only);
:meth:`LayerStack.editing` hands out every layer as an ordinary module and stacks them back on exit
(how adapters are attached and weights are changed in place).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

STACK_AXIS = "layers"


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _with_axes(var: nnx.Variable, value, axes) -> nnx.Variable:
    return var.replace(value) if axes is None else var.replace(value, logical_axes=axes)


def _stacked_axes(var: nnx.Variable):
    axes = var.get_metadata().get("logical_axes")
    return None if axes is None else (STACK_AXIS, *axes)


def _layer_axes(var: nnx.Variable):
    axes = var.get_metadata().get("logical_axes")
    return None if axes is None or axes[:1] != (STACK_AXIS,) else tuple(axes[1:])


def stack_states(states: Sequence[nnx.State]) -> nnx.State:
    """Per-layer states of identical modules → one state, each variable stacked on axis 0."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    return jax.tree.map(lambda v: _with_axes(v, v.get_value(), _stacked_axes(v)), stacked,
                        is_leaf=_is_var)


def layer_state(stacked: nnx.State, index) -> nnx.State:
    """Layer ``index`` (static or traced) of a stacked state, with per-layer metadata."""
    return jax.tree.map(
        lambda v: _with_axes(v, jax.lax.dynamic_index_in_dim(v.get_value(), index, keepdims=False),
                             _layer_axes(v)), stacked, is_leaf=_is_var)


def unstacked_state(stacked_layer: nnx.State) -> nnx.State:
    """A state sliced by ``lax.scan`` (per-layer values, stacked metadata) with per-layer metadata."""
    return jax.tree.map(lambda v: _with_axes(v, v.get_value(), _layer_axes(v)), stacked_layer,
                        is_leaf=_is_var)


def slice_state(stacked: nnx.State, start: int, stop: int) -> nnx.State:
    return jax.tree.map(lambda x: x[start:stop], stacked)


def per_layer_flat(flat: dict, sizes: Sequence[int], prefix: tuple = ("layers",)) -> dict:
    """A flat state (``{path: Variable}``, as ``nnx.to_flat_state`` gives) with the stacked
    ``prefix + ("groups", g, *rest)`` entries split into per-layer ``prefix + (i, *rest)`` ones.
    Works on abstract states (``jax.ShapeDtypeStruct`` values) too."""
    out, starts = {}, [sum(sizes[:g]) for g in range(len(sizes))]
    n = len(prefix)
    for path, var in flat.items():
        if tuple(path[:n]) != tuple(prefix) or path[n] != "groups":
            out[path] = var
            continue
        g, rest = path[n + 1], tuple(path[n + 2:])
        value = var.get_value()
        for j in range(sizes[g]):
            layer_value = (jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
                           if isinstance(value, jax.ShapeDtypeStruct) else value[j])
            out[(*prefix, starts[g] + j, *rest)] = _with_axes(var, layer_value, _layer_axes(var))
    return out


def stacked_flat(flat: dict, sizes: Sequence[int], prefix: tuple = ("layers",)) -> dict:
    """The inverse of :func:`per_layer_flat`: per-layer entries stacked into their groups (host
    arrays are stacked on the host, then placed once)."""
    out, layers = {}, {}
    n = len(prefix)
    for path, var in flat.items():
        if tuple(path[:n]) == tuple(prefix) and isinstance(path[n], int):
            layers.setdefault(tuple(path[n + 1:]), {})[path[n]] = var
        else:
            out[path] = var
    start = 0
    for g, size in enumerate(sizes):
        for rest, per_layer in layers.items():
            vars_ = [per_layer[i] for i in range(start, start + size)]
            values = [v.get_value() for v in vars_]
            stack = np.stack if all(isinstance(x, np.ndarray) for x in values) else jnp.stack
            out[(*prefix, "groups", g, *rest)] = _with_axes(
                vars_[0], jnp.asarray(stack(values)), _stacked_axes(vars_[0]))
        start += size
    return out


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose variables stack those of ``modules`` (which must have one structure)."""
    graphdefs, states = zip(*(nnx.split(m) for m in modules), strict=True)
    if any(g != graphdefs[0] for g in graphdefs[1:]):
        raise ValueError("stacked layers must share one structure (same class, sub-modules and "
                         "adapters); attach adapters to every layer or to none.")
    return nnx.merge(graphdefs[0], stack_states(states))


def unstack_module(stacked: nnx.Module) -> list[nnx.Module]:
    """The per-layer modules of a stacked module (copies)."""
    graphdef, state = nnx.split(stacked)
    n = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, layer_state(state, j)) for j in range(n)]


def runs(kinds: Sequence) -> list[tuple[int, int]]:
    """Maximal ``[start, stop)`` runs of equal consecutive ``kinds``."""
    out: list[tuple[int, int]] = []
    for i, kind in enumerate(kinds):
        if out and kinds[out[-1][0]] == kind:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


class LayerStack(nnx.Module):
    """``n`` decoder layers stored as stacked groups of consecutive layers (``sizes``)."""

    def __init__(self, layers: Sequence[nnx.Module], sizes: Sequence[int] | None = None):
        self._restack(layers, (len(layers),) if sizes is None else sizes)

    @property
    def starts(self) -> tuple[int, ...]:
        return tuple(sum(self.sizes[:g]) for g in range(len(self.sizes)))

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, i: int) -> tuple[int, int]:
        """(group, index within the group) of layer ``i``."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"layer {i} out of range for {len(self)} layers.")
        i %= len(self)
        for g, (start, size) in enumerate(zip(self.starts, self.sizes, strict=True)):
            if i < start + size:
                return g, i - start
        raise AssertionError("unreachable")

    def __getitem__(self, i):
        """A copy of layer ``i`` (a slice: a list of copies); changes to it do not reach the stack:
        use :meth:`editing` for that."""
        if isinstance(i, slice):
            return [self[j] for j in range(len(self))[i]]
        g, j = self.locate(i)
        graphdef, state = nnx.split(self.groups[g])
        return nnx.merge(graphdef, layer_state(state, j))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def unstacked(self) -> list[nnx.Module]:
        """Every layer as its own module (copies), in order."""
        return [layer for group in self.groups for layer in unstack_module(group)]

    def _restack(self, layers: Sequence[nnx.Module], sizes: Sequence[int]) -> None:
        _check_sizes(tuple(sizes), len(layers))
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        self.groups = nnx.List([stack_modules(layers[a:a + s]) for a, s in zip(starts, sizes,
                                                                               strict=True)])
        self.sizes = tuple(int(s) for s in sizes)

    def regroup(self, sizes: Sequence[int]) -> None:
        """Store the layers as groups of ``sizes`` consecutive layers (in place, outside ``jit``;
        do it before building an optimizer, whose state follows the parameter tree)."""
        sizes = tuple(int(s) for s in sizes)
        if sizes != self.sizes:
            self._restack(self.unstacked(), sizes)

    def regroup_for(self, kinds: Sequence) -> None:
        """Group so that every run of equal ``kinds`` (one per layer) covers whole groups."""
        if len(kinds) != len(self):
            raise ValueError(f"{len(kinds)} layer kinds for {len(self)} layers.")
        cuts = {a for a, _ in runs(kinds)} | set(self.starts)
        if cuts != set(self.starts):
            bounds = sorted(cuts) + [len(self)]
            self.regroup([b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)])

    @contextlib.contextmanager
    def editing(self):
        """``with stack.editing() as layers:`` every layer as an ordinary module, to change in
        place (weights, adapters); stacked back, with the same groups, on exit."""
        layers = self.unstacked()
        yield layers
        self._restack(layers, self.sizes)


def _check_sizes(sizes: tuple[int, ...], n: int) -> None:
    if not sizes or any(s < 1 for s in sizes) or sum(sizes) != n:
        raise ValueError(f"layer group sizes {sizes} must be positive and add up to {n} layers.")
