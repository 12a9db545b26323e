"""Static-capacity token routing: pick K of N tokens, compute on them, merge back.

XLA needs K at compile time, so every selection rule here is "top-k at a static capacity plus a
``valid`` mask": threshold rules and padding mark surplus slots invalid instead of changing shapes.
Indices inside a :class:`Selection` are ascending, so causal order on the compacted sequence equals
causal order on the original positions.

**Sequence sharding.** With the sequence split into ``shards`` contiguous pieces (the mesh's ``seq``
axis), :func:`per_shard` selects inside each piece at ``ceil(capacity / shards)`` and offsets the
indices, so no device needs another's scores and the indices stay globally ascending. Such a
:class:`Selection` records ``shards``; :func:`gather` and :func:`scatter_add` then address each piece
locally, so XLA never gathers the whole sequence. Per-shard top-k is not global top-k: every piece keeps
the same number of items, however its scores compare with the others'.

**Block-granular movement.** A selection of whole blocks (:func:`expand_blocks`,
:func:`block_topk_select`: LeMo's 64-token blocks) records its static ``block_size``. Its ``indices``
are still token indices, but :func:`gather` and :func:`scatter_add` move whole ``[block_size, ...]``
slabs addressed by block index (``x`` viewed as [B, N/b, b, ...]): K/b index rows instead of K, and
the indices carry XLA's ``indices_are_sorted`` / ``unique_indices`` hints, true by construction
(top-k block indices are distinct and sorted ascending, padding blocks included). Token-level
selections (SUBLLM's, which may repeat an index in invalid slots) take the row-wise path, unhinted.

Selection is discrete: the scores passed to the ``*_select`` functions receive **no gradient** from
here. Methods that learn their scores (SUBLLM's weights, LeMo's predictors) add their own paths.
``gather`` and ``scatter_add`` are differentiable in the gathered / scattered values.

**Checks.** Bad static arguments (``capacity``, ``shards``, ``block_size``) raise a one-line
``ValueError``. Indices are not checked by default (XLA would clamp a gather and drop a scatter out
of range): with :func:`tokensparse.validation.debug_checks` (or ``TOKENSPARSE_DEBUG_CHECKS=1``),
:func:`gather` and :func:`scatter_add` check that every valid slot's index is in range, eagerly on
concrete selections and with ``jax.experimental.checkify`` on traced ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tokensparse.sharding import seq_pieces
from tokensparse.validation import check_indices, debug_enabled


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Selection:
    """K chosen positions per row. ``indices`` ascending per row; ``valid`` False for padding slots.

    ``shards`` > 1 (static) says the rows were selected piecewise (:func:`per_shard`): the k-th of
    ``shards`` equal runs of slots holds indices inside the k-th of ``shards`` equal runs of positions.

    ``block_size`` > 1 (static) says the slots come in whole blocks: slots ``j·b … j·b+b−1`` hold
    positions ``n·b … n·b+b−1`` of one block n, valid alike, and the block indices n of each row are
    distinct and ascending (what :func:`expand_blocks` builds). Routing then moves whole blocks.
    """

    indices: Int[Array, "b k"]
    valid: Bool[Array, "b k"]
    shards: int = dataclasses.field(default=1, metadata=dict(static=True))
    block_size: int = dataclasses.field(default=1, metadata=dict(static=True))

    @property
    def capacity(self) -> int:
        return self.indices.shape[-1]

    def __post_init__(self):
        _check_static(self.shards, "shards")
        _check_static(self.block_size, "block_size")

    @property
    def blocks(self) -> tuple[Int[Array, "b kb"], Bool[Array, "b kb"]]:
        """(block indices, block validity), [B, K / block_size] each: one entry per block slot."""
        b = self.block_size
        return self.indices[:, ::b] // b, self.valid[:, ::b]

    def tokens(self) -> Selection:
        """The same slots as a token-level selection (row-wise routing; the reference path)."""
        return Selection(self.indices, self.valid, self.shards)


def capacity(n: int, keep_ratio: float, *, multiple: int = 1, rounding: str = "ceil") -> int:
    """Static number of kept items out of ``n`` at ``keep_ratio``, rounded up to ``multiple`` (≤ n).

    ``rounding="ceil"`` is SUBLLM's rule, ``"floor"`` LeMo's; at least one item is always kept.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio={keep_ratio} must be in (0, 1].")
    if n <= 0:
        raise ValueError(f"n={n} must be positive.")
    if multiple <= 0:
        raise ValueError(f"multiple={multiple} must be positive.")
    if rounding not in ("ceil", "floor"):
        raise ValueError(f"rounding={rounding!r} must be 'ceil' or 'floor'.")
    exact = n * keep_ratio
    # Guard against 0.64 * 4096 = 2621.4400000000001-style float noise before rounding.
    k = math.ceil(exact - 1e-9) if rounding == "ceil" else math.floor(exact + 1e-9)
    k = max(1, k)
    k = -(-k // multiple) * multiple
    return min(k, n)


def _check_static(value, what: str) -> int:
    """A static positive int (shards, block_size): one-line ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{what}={value!r} must be a positive static integer.")
    return int(value)


def _check_capacity(k: int, n: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer):
        raise TypeError(f"{what}={k!r} must be a static integer (a Python or NumPy int known at "
                        f"trace time), got {type(k).__name__}.")
    k = int(k)
    if k <= 0 or k > n:
        raise ValueError(f"{what}={k} must satisfy 0 < {what} <= {n} (the number of candidates).")
    return k


def _sorted_selection(indices: Int[Array, "b k"], valid: Bool[Array, "b k"]) -> Selection:
    order = jnp.argsort(indices, axis=-1)
    return Selection(
        indices=jnp.take_along_axis(indices, order, axis=-1).astype(jnp.int32),
        valid=jnp.take_along_axis(valid, order, axis=-1),
    )


def per_shard(select: Callable, scores: Float[Array, "b n"], capacity: int, shards: int,
              valid: Bool[Array, "b n"] | None = None, **kwargs):
    """``select(scores, capacity, valid=valid, **kwargs)`` run independently on each of ``shards``
    contiguous pieces of every row, each at ``ceil(capacity / shards)`` (at most the piece length).

    ``select`` returns a :class:`Selection` or a tuple whose first item is one and whose other items
    are per-slot arrays [rows, k] (e.g. SUBLLM's weights); they are reassembled alike.
    """
    if _check_static(shards, "shards") == 1:
        return select(scores, capacity, valid=valid, **kwargs)
    b, n = scores.shape
    if n % shards:
        raise ValueError(f"{n} candidates cannot be split into {shards} equal sequence shards; make "
                         "the (compacted) sequence length a multiple of the mesh's seq axis.")
    local_n = n // shards
    local_k = min(-(-_check_capacity(capacity, n, "capacity") // shards), local_n)

    def fold(x):
        return None if x is None else jnp.broadcast_to(x, (b, n)).reshape(b * shards, local_n)

    out = select(fold(scores), local_k, valid=fold(valid), **kwargs)
    sel, extras = (out, ()) if isinstance(out, Selection) else (out[0], tuple(out[1:]))
    offsets = (jnp.arange(shards, dtype=jnp.int32) * local_n)[None, :, None]
    indices = (sel.indices.reshape(b, shards, local_k) + offsets).reshape(b, shards * local_k)
    result = Selection(indices, sel.valid.reshape(b, shards * local_k), shards=shards)
    if not extras:
        return result
    return (result, *(x.reshape(b, shards * local_k, *x.shape[2:]) for x in extras))


def topk_select(
    scores: Float[Array, "b n"], capacity: int, valid: Bool[Array, "b n"] | None = None, *,
    shards: int = 1,
) -> Selection:
    """The ``capacity`` highest-scoring positions per row, returned in ascending position order.

    Positions with ``valid=False`` are never chosen while valid ones remain; slots that had to be
    filled with them are marked invalid. Ties break towards the lower position (deterministic).
    ``shards`` > 1 selects per sequence shard (:func:`per_shard`).
    """
    if _check_static(shards, "shards") != 1:
        return per_shard(topk_select, scores, capacity, shards, valid)
    n = scores.shape[-1]
    capacity = _check_capacity(capacity, n, "capacity")
    scores = jax.lax.stop_gradient(scores).astype(jnp.float32)
    if valid is None:
        valid = jnp.ones(scores.shape, bool)
    # Valid scores (even -inf or NaN, which rank lowest among them) always outrank invalid slots.
    lowest = jnp.finfo(jnp.float32).min
    finite = jnp.nan_to_num(scores, nan=lowest, neginf=lowest)
    ranked = jnp.where(valid, finite, -jnp.inf)
    _, indices = jax.lax.top_k(ranked, capacity)
    return _sorted_selection(indices, jnp.take_along_axis(valid, indices, axis=-1))


def threshold_select(
    scores: Float[Array, "b n"],
    capacity: int,
    threshold: float = 0.0,
    valid: Bool[Array, "b n"] | None = None,
) -> Selection:
    """Every position with ``score > threshold``, first-come up to ``capacity``.

    Overflow keeps the earliest positions, so the decision for token t depends only on tokens ≤ t: the
    rule is causal and token-by-token decoding reproduces it exactly.
    """
    n = scores.shape[-1]
    capacity = _check_capacity(capacity, n, "capacity")
    keep = jax.lax.stop_gradient(scores) > threshold
    if valid is not None:
        keep = keep & valid
    position = jnp.arange(n, dtype=jnp.float32)
    # Earliest kept positions rank highest; unkept positions fill the remaining slots as invalid.
    _, indices = jax.lax.top_k(jnp.where(keep, -position, -position - 2 * n), capacity)
    return _sorted_selection(indices, jnp.take_along_axis(keep, indices, axis=-1))


def expand_blocks(block_selection: Selection, block_size: int) -> Selection:
    """Block-level selection → token-level selection (each block expands to its ``block_size``
    tokens) that remembers ``block_size``, so that routing moves whole blocks.

    The block indices must be distinct and ascending per row (any top-k or threshold selection over
    blocks is)."""
    block_size = _check_static(block_size, "block_size")
    offsets = jnp.arange(block_size, dtype=jnp.int32)
    indices = block_selection.indices[..., :, None] * block_size + offsets
    valid = jnp.broadcast_to(block_selection.valid[..., :, None], indices.shape)
    b = indices.shape[0]
    return Selection(indices.reshape(b, -1), valid.reshape(b, -1), shards=block_selection.shards,
                     block_size=block_size)


def block_topk_select(
    block_scores: Float[Array, "b nb"],
    block_size: int,
    capacity_blocks: int,
    valid_blocks: Bool[Array, "b nb"] | None = None,
    *,
    shards: int = 1,
) -> Selection:
    """Top ``capacity_blocks`` blocks by score, expanded to ascending token indices.

    The token capacity is ``capacity_blocks * block_size``; a chosen block that was not valid (e.g. a
    padding block) is invalid in all its token slots. ``shards`` > 1 selects per sequence shard.
    """
    block_size = _check_static(block_size, "block_size")
    blocks = topk_select(block_scores, capacity_blocks, valid_blocks, shards=shards)
    return expand_blocks(blocks, block_size)


def _take_rows(x: Array, indices: Int[Array, "b k"]) -> Array:
    return jax.vmap(lambda row, idx: row[idx])(x, indices)


def _local_indices(sel: Selection, n: int) -> Int[Array, "b s k"]:
    """The selection's indices relative to the start of their piece, [B, shards, K/shards]."""
    b, k, s = *sel.indices.shape, sel.shards
    offsets = (jnp.arange(s, dtype=jnp.int32) * (n // s))[None, :, None]
    return sel.indices.reshape(b, s, k // s) - offsets


def _check_selection(sel: Selection, n: int, what: str) -> None:
    """Debug mode: the valid slots' indices lie in the sequence (and, per shard, in their piece)."""
    if not debug_enabled():
        return
    check_indices(sel.indices, sel.valid, n, what=what)
    if sel.shards > 1:
        check_indices(_local_indices(sel, n), seq_pieces(sel.valid, sel.shards), n // sel.shards,
                      what=f"{what} (index within its sequence shard)")


def _per_piece(fn):
    return jax.vmap(jax.vmap(fn))


def _block_view(x: Array, block_size: int) -> Array:
    """[B, N, ...] viewed as [B, N / block_size, block_size, ...]."""
    b, n = x.shape[:2]
    if n % block_size:
        raise ValueError(f"a sequence of {n} cannot be split into blocks of {block_size}; pad it to "
                         "a multiple of the block size.")
    return x.reshape(b, n // block_size, block_size, *x.shape[2:])


def _local_blocks(sel: Selection, n_blocks: int) -> tuple[Array, Array]:
    """Block indices and validity, [B, shards, K_b/shards], relative to the start of their piece."""
    idx, valid = sel.blocks
    b, k, s = *idx.shape, sel.shards
    offsets = (jnp.arange(s, dtype=jnp.int32) * (n_blocks // s))[None, :, None]
    return idx.reshape(b, s, k // s) - offsets, valid.reshape(b, s, k // s)


_HINTS = dict(indices_are_sorted=True, unique_indices=True, mode="promise_in_bounds")


def _take_blocks(row, idx):
    return row.at[idx].get(**_HINTS)


def _add_blocks(row, idx, valid, val):
    # Invalid slots add zero at their own (distinct, in-range) block, so the hints stay true.
    val = jnp.where(valid.reshape(valid.shape + (1,) * (val.ndim - 1)), val, jnp.zeros((), val.dtype))
    return row.at[idx].add(val, **_HINTS)


def _gather_blocks(x: Array, sel: Selection) -> Array:
    xb = _block_view(x, sel.block_size)
    if sel.shards == 1:
        out = jax.vmap(_take_blocks)(xb, sel.blocks[0])
    else:
        out = _per_piece(_take_blocks)(seq_pieces(xb, sel.shards),
                                       _local_blocks(sel, xb.shape[1])[0])
    return out.reshape(x.shape[0], sel.capacity, *x.shape[2:])


def _scatter_add_blocks(base: Array, sel: Selection, values: Array) -> Array:
    bb = _block_view(base, sel.block_size)
    vb = _block_view(values, sel.block_size)
    if sel.shards == 1:
        idx, valid = sel.blocks
        out = jax.vmap(_add_blocks)(bb, idx, valid, vb)
    else:
        s = sel.shards
        out = _per_piece(_add_blocks)(seq_pieces(bb, s), *_local_blocks(sel, bb.shape[1]),
                                      seq_pieces(vb, s))
    return out.reshape(base.shape)


def gather(x: Array, sel: Selection, *, fill_value=None) -> Array:
    """``x[b, sel.indices[b]]`` for arrays shaped [B, N, ...] (tokens, positions, segment ids).

    With ``fill_value`` set, invalid slots read it instead of their (meaningless) gathered row; use it
    for segment ids (fill -1: the slot attends to nothing). A per-shard selection reads each piece
    locally; a block selection reads whole blocks. Indices are checked in debug mode only.
    """
    _check_selection(sel, x.shape[1], "routing.gather")
    if sel.block_size > 1:
        out = _gather_blocks(x, sel)
    elif sel.shards == 1:
        out = _take_rows(x, sel.indices)
    else:
        local = _per_piece(lambda row, idx: row[idx])(seq_pieces(x, sel.shards),
                                                      _local_indices(sel, x.shape[1]))
        out = local.reshape(x.shape[0], sel.indices.shape[1], *x.shape[2:])
    if fill_value is not None:
        mask = sel.valid.reshape(sel.valid.shape + (1,) * (out.ndim - 2))
        out = jnp.where(mask, out, jnp.asarray(fill_value, out.dtype))
    return out


def _add_rows(row, idx, valid, val):
    idx = jnp.where(valid, idx, row.shape[0])  # invalid slots point past the end and are dropped
    return row.at[idx].add(val, mode="drop")


def scatter_add(base: Array, sel: Selection, values: Array) -> Array:
    """``base`` with ``values`` added at the selected rows; invalid slots write nothing.

    Rows that were not selected come back bit-for-bit unchanged (in a block selection, a padding
    block's slot adds +0.0 to its block: values unchanged, only a −0.0 turns +0.0). A per-shard
    selection writes each piece locally; a block selection writes whole blocks. Indices are
    checked in debug mode only.
    """
    _check_selection(sel, base.shape[1], "routing.scatter_add")
    values = values.astype(base.dtype)
    if sel.block_size > 1:
        return _scatter_add_blocks(base, sel, values)
    if sel.shards == 1:
        return jax.vmap(_add_rows)(base, sel.indices, sel.valid, values)
    s = sel.shards
    out = _per_piece(_add_rows)(seq_pieces(base, s), _local_indices(sel, base.shape[1]),
                                seq_pieces(sel.valid, s), seq_pieces(values, s))
    return out.reshape(base.shape)


def all_tokens(batch: int, n: int) -> Selection:
    """The selection of every position: routing through it equals the dense computation."""
    indices = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (batch, n))
    return Selection(indices, jnp.ones((batch, n), bool))
