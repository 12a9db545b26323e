"""Training-free estimates of the oracle block scores from the exact (frozen) q, k projections.

They answer "how well can a cheap function of the layer's own q and k rank blocks?", the yardstick
for the learned predictors (:mod:`tokensparse.lemo.predictor`), which see only the normed input X.
The oracle tile (the spec's block score) is max over the b×b query/key pairs of Σ_h ReLU(q·k);
each estimator replaces one or both sides of the pair by a summary of its block:

- ``block_mean``: the block means q̄_m, k̄_n; one pair per tile. O(n_b² · H · d).
- ``query_mean``: q̄_m against every key token, the max taken over the key block. O(n_b · T · H · d),
  1/b of the attention logits' cost; compiled memory grows linearly in T.
- ``top_norm``: the ``r`` query and ``r`` key tokens of largest ‖·‖ (summed over heads) in each
  block; the max over their r² pairs. O(n_b² · r² · H · d).

Each returns column scores [B, n_b] (Σ over query blocks, as :func:`scoring.column_scores`), in the
oracle's units up to the normaliser, which ranking ignores. q and k are [B, T, H, d] and
[B, T, H_kv, d], pre-RoPE, T a multiple of the block size. Analysis tools, not a selector: the
library's fine-tuning path selects with the oracle or the learned predictors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def _blocks(q, k, block_size: int):
    """fp32 [B, n_b, b, H, d] views of q and of k with its heads repeated to H."""
    b, t, h, d = q.shape
    if t % block_size or k.shape[:2] != (b, t) or h % k.shape[2]:
        raise ValueError(f"q {q.shape} and k {k.shape} must be [B, T, H, d] and [B, T, Hkv, d] with T "
                         f"a multiple of block_size={block_size} and H a multiple of Hkv.")
    k = jnp.repeat(k, h // k.shape[2], axis=2)
    shape = (b, t // block_size, block_size, h, d)
    return q.astype(jnp.float32).reshape(shape), k.astype(jnp.float32).reshape(shape)


def _pair_max(qr: Array, kr: Array) -> Float[Array, "b nb"]:
    """Column sums of max over representative pairs: qr, kr [B, n_b, r, H, d]."""
    logits = jnp.einsum("bmihd,bnjhd->bmnijh", qr, kr)
    return jnp.maximum(logits, 0.0).sum(-1).max(axis=(-1, -2)).sum(axis=1)


def block_mean(q, k, block_size: int = 64) -> Float[Array, "b nb"]:
    qb, kb = _blocks(q, k, block_size)
    return _pair_max(qb.mean(2, keepdims=True), kb.mean(2, keepdims=True))


def query_mean(q, k, block_size: int = 64) -> Float[Array, "b nb"]:
    qb, kb = _blocks(q, k, block_size)
    logits = jnp.einsum("bmhd,bnjhd->bmnjh", qb.mean(2), kb)  # XLA fuses it into the max: no [n_b, T]
    return jnp.maximum(logits, 0.0).sum(-1).max(-1).sum(axis=1)


def top_norm(q, k, block_size: int = 64, r: int = 8) -> Float[Array, "b nb"]:
    if not 1 <= r <= block_size:
        raise ValueError(f"r={r} must be in [1, block_size={block_size}].")
    qb, kb = _blocks(q, k, block_size)

    def top(x):
        norms = jnp.linalg.norm(x, axis=-1).sum(-1)  # [B, n_b, b]
        idx = jax.lax.top_k(norms, r)[1]
        return jnp.take_along_axis(x, idx[..., None, None], axis=2)

    return _pair_max(top(qb), top(kb))


_BY_NAME = {"block_mean": block_mean, "query_mean": query_mean, "top_norm": top_norm}
ESTIMATORS = tuple(_BY_NAME)


def estimate(name: str, q, k, block_size: int = 64) -> Float[Array, "b nb"]:
    """Column scores of the estimator ``name`` (one of :data:`ESTIMATORS`)."""
    if name not in _BY_NAME:
        raise ValueError(f"estimator {name!r} must be one of {ESTIMATORS}.")
    return _BY_NAME[name](q, k, block_size)
