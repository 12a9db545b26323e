"""Batches of token ids for training and evaluation: packed rows with segment ids (pretraining),
fixed-length windows of long documents (long-context fine-tuning), and sliding evaluation windows
(perplexity).

The inputs are int32 id arrays, one per document, as :func:`tokensparse.data.encode_documents` makes
them. :class:`PackedBatches` and :class:`WindowBatches` build a fixed list of ``seq_len`` rows once;
epoch ``e`` visits them in the order ``np.random.default_rng([seed, e]).permutation(rows)`` and step
``s`` takes rows ``[s*B, (s+1)*B)`` of the concatenation of all epochs. ``batch(step)`` is therefore a
pure function of ``(seed, step)``: resuming a run at step ``s`` continues the same sequence, and every
row appears exactly once per epoch. :func:`eval_windows` yields the deterministic sliding windows for
perplexity.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, NamedTuple

import numpy as np


class Batch(NamedTuple):
    """A training batch; ``Batch(tokens=...)`` alone is one unpadded document per row (positions
    0..T-1, no segments)."""

    tokens: np.ndarray       # [B, T] int32
    positions: np.ndarray | None = None    # [B, T] int32, restart at 0 in every segment
    segment_ids: np.ndarray | None = None  # [B, T] int32, 0, 1, ... within a row; -1 marks padding


def _check_docs(docs: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, d in enumerate(docs):
        d = np.asarray(d)
        if d.ndim != 1 or not (np.issubdtype(d.dtype, np.integer) or d.size == 0):
            raise ValueError(f"docs[{i}] must be a 1-D integer array, got shape {d.shape} {d.dtype}.")
        out.append(d.astype(np.int32))
    if not out or not any(len(d) for d in out):
        raise ValueError("no documents (or only empty ones) to make batches from.")
    return out


def _check_shape(batch_size: int, seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a row needs an input and a target).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")


class _EpochOrder:
    """Row ``g`` of the all-epochs order is ``perm(g // n)[g % n]``, ``perm(e)`` seeded by ``[seed, e]``."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.steps_per_epoch = -(-num_rows // batch_size)
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:  # a batch spans at most a few epochs
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perms[epoch]

    def rows(self, step: int) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        g = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = np.divmod(g, self.num_rows)
        return np.array([self.permutation(int(e))[i] for e, i in zip(epochs, within, strict=True)])


class PackedBatches:
    """Documents packed into ``seq_len`` rows with segment ids, for pretraining.

    All documents are laid end to end in order and cut into rows of ``seq_len``; a document crossing a
    row boundary is split there, so each row holds pieces (<= ``seq_len`` tokens) of consecutive
    documents. Each piece is a segment: ids 0, 1, 2, ... in row order, positions 0..len-1. Only the
    last row has a padded tail (token ``pad_id``, position 0, segment -1). ``steps_per_epoch`` is the
    number of steps that see every row at least once (the last one may wrap into the next epoch).
    """

    def __init__(self, docs: Sequence[np.ndarray], *, batch_size: int, seq_len: int, seed: int = 0,
                 pad_id: int = 0):
        _check_shape(batch_size, seq_len)
        docs = _check_docs(docs)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        stream = np.concatenate(docs)
        n = len(stream)
        num_rows = -(-n // seq_len)
        index = np.arange(num_rows * seq_len)
        boundary = index % seq_len == 0  # a row start begins a new piece, and so does a document start
        boundary[np.cumsum([0, *map(len, docs[:-1])])[[len(d) > 0 for d in docs]]] = True
        valid = index < n
        piece_start = np.maximum.accumulate(np.where(boundary, index, 0))
        segments = np.cumsum(boundary.reshape(num_rows, seq_len), axis=1).reshape(-1) - 1
        shape = (num_rows, seq_len)
        self.tokens = np.pad(stream, (0, len(index) - n), constant_values=pad_id).reshape(shape)
        self.positions = np.where(valid, index - piece_start, 0).astype(np.int32).reshape(shape)
        self.segment_ids = np.where(valid, segments, -1).astype(np.int32).reshape(shape)
        self.num_rows = num_rows
        self._order = _EpochOrder(num_rows, batch_size, seed)
        self.steps_per_epoch = self._order.steps_per_epoch

    def batch(self, step: int) -> Batch:
        rows = self._order.rows(step)
        return Batch(self.tokens[rows], self.positions[rows], self.segment_ids[rows])


class WindowBatches:
    """Windows of exactly ``seq_len`` tokens from long documents, for long-context fine-tuning.

    ``mode == "documents"``: windows start every ``stride`` (default ``seq_len``: non-overlapping)
    inside each document with at least ``seq_len`` tokens; shorter documents and the tail past the last
    whole window are not used. ``mode == "concatenated"``: when no document is that long, the documents
    (each already ending in EOS, as :func:`~tokensparse.data.tokenizer.encode_documents` makes them)
    are joined and cut the same way, so attention crosses document boundaries, as in LeMo's
    "EOS-joined and packed into s-token rows". Every row is one segment (id 0) with positions
    0..seq_len-1.
    """

    def __init__(self, docs: Sequence[np.ndarray], *, batch_size: int, seq_len: int, seed: int = 0,
                 stride: int | None = None):
        _check_shape(batch_size, seq_len)
        docs = _check_docs(docs)
        stride = seq_len if stride is None else stride
        if not 0 < stride <= seq_len:
            raise ValueError(f"stride={stride} must be in [1, seq_len={seq_len}].")
        self.batch_size, self.seq_len, self.seed, self.stride = batch_size, seq_len, seed, stride
        self.mode: Literal["documents", "concatenated"] = "documents"
        if max(len(d) for d in docs) < seq_len:
            self.mode = "concatenated"
            docs = [np.concatenate(docs)]
            if len(docs[0]) < seq_len:
                raise ValueError(f"the documents hold {len(docs[0])} tokens in all, fewer than one "
                                 f"window of seq_len={seq_len}; use a smaller seq_len or more text.")
        self._docs = docs
        pairs = [(i, s) for i, d in enumerate(docs) for s in range(0, len(d) - seq_len + 1, stride)]
        self._windows = np.array(pairs, np.int64).reshape(-1, 2)
        self.num_rows = len(pairs)
        self._order = _EpochOrder(self.num_rows, batch_size, seed)
        self.steps_per_epoch = self._order.steps_per_epoch

    def batch(self, step: int) -> Batch:
        rows = self._order.rows(step)
        tokens = np.stack([self._docs[d][s:s + self.seq_len] for d, s in self._windows[rows]])
        positions = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), tokens.shape).copy()
        return Batch(tokens, positions, np.zeros(tokens.shape, np.int32))


class EvalWindow(NamedTuple):
    """One evaluation window, batch size 1: every field is ``[1, seq_len]``. ``loss_mask[0, j]`` is 1
    where the target "token j+1 from token j" is scored in this window."""

    tokens: np.ndarray       # int32, padded with 0
    positions: np.ndarray    # int32, 0..seq_len-1 (0 on padding)
    segment_ids: np.ndarray  # int32, 0, -1 on padding
    loss_mask: np.ndarray    # float32


def eval_windows(docs: Iterable[np.ndarray], *, seq_len: int, stride: int | None = None
                 ) -> Iterator[EvalWindow]:
    """Sliding-window perplexity windows (the LongLoRA / Hugging Face protocol), in document order.

    Windows of ``seq_len`` tokens start every ``stride`` (default ``seq_len - 1``: back to back,
    sharing one token) in each document; every next-token target of every document is scored exactly
    once, in the window where it has the most context (at least ``seq_len - stride`` tokens, except
    near a document start). The last window of a document is padded. Documents shorter than two
    tokens have no targets and yield nothing.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a window needs an input and a target).")
    stride = seq_len - 1 if stride is None else stride
    if not 0 < stride < seq_len:
        raise ValueError(f"stride={stride} must be in [1, seq_len - 1 = {seq_len - 1}] so that "
                         "consecutive windows leave no target unscored.")
    arange = np.arange(seq_len, dtype=np.int32)
    for doc in docs:
        doc = np.asarray(doc, np.int32)
        scored = 0  # targets (token indices) 1..scored are done
        start = 0
        while scored < len(doc) - 1:
            window = doc[start:start + seq_len]
            n = len(window)
            mask = np.zeros(seq_len, np.float32)
            mask[scored - start:n - 1] = 1.0  # targets scored+1 .. start+n-1
            scored = start + n - 1
            yield EvalWindow(tokens=np.pad(window, (0, seq_len - n))[None],
                             positions=np.where(arange < n, arange, 0)[None],
                             segment_ids=np.where(arange < n, 0, -1).astype(np.int32)[None],
                             loss_mask=mask[None])
            start += stride
