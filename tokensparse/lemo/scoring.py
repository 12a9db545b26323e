"""LeMo block informativeness (spec §2.2): which 64-token blocks receive the most attention mass.

For query heads h, tokens i (query) and j (key)::

    A_ij     = Σ_h ReLU(q_ih · k_jh)            (optionally · 1/√d and / H)
    tile[m,n] = max_{i ∈ block m, j ∈ block n} A_ij / normalizer
    c_n      = Σ_m tile[m, n]                    (the block's column score)

Only positive per-head logits count, so negative logits cannot cancel positive ones; max-pooling
keeps a whole block alive for one important token. The defaults are the artifact's *target kernel*
(no 1/√d, no /H, no causal mask, diagonal included, /1024 = 64·16).

**Pre- or post-RoPE is decided by the caller**: these functions score whatever q, k they are given.
The library default (``ScoreOptions.post_rope=False``, recorded with every result) is to pass the
per-head projections *before* RoPE, as the artifact does.

**Padding** (spec §4.6): T need not be a multiple of ``block_size``; the sequence is padded up to
``n_b = ceil(T / block_size)`` blocks. Padding tokens, and tokens with ``valid=False``, contribute
nothing: every entry A_ij with an invalid i or j is 0 (it never raises a tile max, and a tile with
no valid entry is 0). A key block with no valid token at all scores −inf, so top-k never picks
it while real blocks remain (a partially padded last block is a real block).

Scores drive a discrete selection and carry no gradient (:func:`block_scores` stops it). Cost is
O(H·T²·d), like attention, so use them for predictor targets, recall and ``selector="oracle"``, not
in the default training hot path.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from tokensparse import routing


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """Which variant of the block score to compute (every result should record these flags).

    A static pytree node, so it can be passed straight into ``jax.jit``-ed functions.

    - ``scale_by_sqrt_d``: multiply logits by 1/√head_dim (the artifact's ablation oracle).
    - ``divide_by_heads``: average instead of sum over heads (the paper's A_ij).
    - ``causal``: only tiles with query block m ≥ key block n contribute (tile-level mask; the
      diagonal tile is whole). The default ranks the whole sequence, future queries included (§4.4).
    - ``exclude_diagonal``: drop the token-level entries i == j (the paper's Σ_{i≠j}); the artifact
      includes them.
    - ``normalizer``: divides every tile (the artifact's 1024 = 64·16); ranking is unaffected.
    - ``post_rope``: not used here: tells the caller whether to pass rotated q, k (default: no).
    """

    block_size: int = 64
    scale_by_sqrt_d: bool = False
    divide_by_heads: bool = False
    causal: bool = False
    exclude_diagonal: bool = False
    normalizer: float = 1024.0
    post_rope: bool = False

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"ScoreOptions.block_size={self.block_size!r} must be a positive int.")
        if not self.normalizer > 0:
            raise ValueError(f"ScoreOptions.normalizer={self.normalizer} must be positive.")


def num_blocks(seq_len: int, block_size: int) -> int:
    """Blocks covering ``seq_len`` tokens; the last one may be partly padding."""
    return -(-seq_len // block_size)


def _token_mask(valid, b: int, t: int, block_size: int) -> Bool[Array, "b tp"]:
    """The valid mask (all True by default), padded with False to a whole number of blocks."""
    if valid is None:
        valid = jnp.ones((b, t), bool)
    elif valid.shape != (b, t):
        raise ValueError(f"valid has shape {valid.shape}; expected [B, T] = {(b, t)}.")
    pad = num_blocks(t, block_size) * block_size - t
    return jnp.pad(valid.astype(bool), ((0, 0), (0, pad)))


def _prepare(q, k, opts: ScoreOptions, valid):
    """fp32 q, k and a token mask, all padded to a whole number of blocks; the logit factor."""
    b, t, h, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"q {q.shape} and k {k.shape} must be [B, T, H, D] and [B, T, Hkv, D] "
                         f"with H a multiple of Hkv.")
    valid = _token_mask(valid, b, t, opts.block_size)
    pad = valid.shape[1] - t
    q = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    k = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return q, k, valid, _logit_factor(opts, h, d)


def _logit_factor(opts: ScoreOptions, heads: int, head_dim: int) -> float:
    return (1.0 / math.sqrt(head_dim) if opts.scale_by_sqrt_d else 1.0) / (
        heads if opts.divide_by_heads else 1.0)


def _empty_columns_neginf(tiles: Float[Array, "b nb nb"], valid: Bool[Array, "b tp"],
                          block_size: int) -> Float[Array, "b nb nb"]:
    """−inf in the columns of key blocks without a valid token (``valid`` padded to whole blocks)."""
    key_ok = valid.reshape(valid.shape[0], -1, block_size).any(axis=-1)
    return jnp.where(key_ok[:, None, :], tiles, -jnp.inf)


def block_scores_reference(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hkv d"],
    opts: ScoreOptions | None = None,
    *,
    valid: Bool[Array, "b t"] | None = None,
) -> Float[Array, "b nb nb"]:
    """The tile matrix ``tile[b, m, n]`` (query block m, key block n), densely.

    Materialises the [B, H, T, T] logits: for tests and small inputs only. Columns of key blocks
    without a valid token are −inf, so :func:`column_scores` gives them −inf.
    """
    opts = opts or ScoreOptions()
    q, k, valid, factor = _prepare(q, k, opts, valid)
    bsz, tp, h, _ = q.shape
    k = jnp.repeat(k, h // k.shape[2], axis=2)
    logits = jnp.einsum("bihd,bjhd->bhij", q, k)
    a = jnp.sum(jnp.maximum(logits, 0.0), axis=1) * factor
    mask = valid[:, :, None] & valid[:, None, :]
    if opts.exclude_diagonal:
        mask = mask & ~jnp.eye(tp, dtype=bool)
    a = jnp.where(mask, a, 0.0)
    nb, bs = tp // opts.block_size, opts.block_size
    tiles = a.reshape(bsz, nb, bs, nb, bs).max(axis=(2, 4)) / opts.normalizer
    if opts.causal:
        tiles = jnp.where(jnp.tril(jnp.ones((nb, nb), bool)), tiles, 0.0)
    return _empty_columns_neginf(tiles, valid, bs)


def column_scores(tiles: Float[Array, "b nb nb"]) -> Float[Array, "b nb"]:
    """c_n = Σ_m tile[m, n]: the block score of key block n."""
    return jnp.sum(tiles, axis=1)


BACKENDS = ("auto", "xla", "pallas")


def _pallas_reason(block_size: int) -> str | None:
    """None when the Pallas kernel can score here; otherwise why not."""
    try:
        from kernels_pallas import block_scores as kernel
    except ImportError:  # a build without the kernels package
        return "kernels_pallas is not installed"
    return kernel.supports(block_size)


def _resolve_backend(backend: str, block_size: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"block score backend={backend!r}; choose one of {BACKENDS}.")
    if backend == "xla":
        return "xla"
    reason = _pallas_reason(block_size)
    if reason is None:
        return "pallas"
    if backend == "pallas":
        warnings.warn(f"block score backend 'pallas' unavailable ({reason}); using 'xla'.",
                      stacklevel=3)
    return "xla"


def _pallas_tiles(q, k, opts: ScoreOptions, valid):
    from kernels_pallas import block_scores as kernel

    factor = _logit_factor(opts, q.shape[2], q.shape[3])
    return kernel.block_tiles(q, k, block_size=opts.block_size, valid=valid,
                              scale=factor / opts.normalizer, causal=opts.causal,
                              exclude_diagonal=opts.exclude_diagonal,
                              # off a GPU only reachable when TOKENSPARSE_PALLAS_INTERPRET is set
                              interpret=jax.default_backend() != "gpu")


def block_tiles(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hkv d"],
    opts: ScoreOptions | None = None,
    *,
    valid: Bool[Array, "b t"] | None = None,
    backend: str = "auto",
) -> Float[Array, "b nb nb"]:
    """The tile matrix of :func:`block_scores_reference` with memory linear in T (predictor targets).

    ``backend="xla"``: a ``lax.scan`` over query blocks; each step forms one [B, H, block, T] slab of
    logits and reduces it to one row of tile maxima [B, n_b], so no [T, T] tensor ever exists (the
    result is n_b², i.e. T² / block²). K heads are shared by their query-head group instead of being
    repeated. ``"pallas"``: the tile-by-tile kernel of ``kernels_pallas.block_scores`` (GPU, or
    interpret mode when ``TOKENSPARSE_PALLAS_INTERPRET`` is set), which keeps even the slab in
    on-chip memory; it falls back to ``"xla"`` with a warning where it cannot run. ``"auto"`` picks
    the kernel where it runs natively. Computed in fp32 under ``stop_gradient``.
    """
    opts = opts or ScoreOptions()
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    if _resolve_backend(backend, opts.block_size) == "pallas":
        tiles = _pallas_tiles(q, k, opts, valid)
        mask = _token_mask(valid, q.shape[0], q.shape[1], opts.block_size)
        return _empty_columns_neginf(tiles, mask, opts.block_size)
    return _scan_tiles(q, k, opts, valid)


def _scan_tiles(q, k, opts: ScoreOptions, valid):
    """:func:`block_tiles`' ``"xla"`` backend: one query block per ``lax.scan`` step."""
    q, k, valid, factor = _prepare(q, k, opts, valid)
    bsz, tp, h, d = q.shape
    hkv, bs = k.shape[2], opts.block_size
    nb = tp // bs
    # [nb, B, bs, Hkv, G, D]: query blocks as the scanned axis, heads grouped by their K head.
    q_blocks = q.reshape(bsz, nb, bs, hkv, h // hkv, d).transpose(1, 0, 2, 3, 4, 5)
    q_valid = valid.reshape(bsz, nb, bs).transpose(1, 0, 2)
    key_pos = jnp.arange(tp)
    block_ids = jnp.arange(nb)

    def row(carry, inputs):
        qm, qm_valid, m = inputs
        logits = jnp.einsum("bikgd,bjkd->bkgij", qm, k)
        a = jnp.sum(jnp.maximum(logits, 0.0), axis=(1, 2)) * factor  # [B, bs, Tp]
        mask = qm_valid[:, :, None] & valid[:, None, :]
        if opts.exclude_diagonal:
            mask = mask & ((m * bs + jnp.arange(bs))[:, None] != key_pos[None, :])
        a = jnp.where(mask, a, 0.0)
        tiles = a.reshape(bsz, bs, nb, bs).max(axis=(1, 3)) / opts.normalizer  # [B, nb]
        if opts.causal:
            tiles = jnp.where(block_ids <= m, tiles, 0.0)
        return carry, tiles

    _, rows = jax.lax.scan(row, None, (q_blocks, q_valid, block_ids))
    return _empty_columns_neginf(rows.transpose(1, 0, 2), valid, bs)


def block_scores(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hkv d"],
    opts: ScoreOptions | None = None,
    *,
    valid: Bool[Array, "b t"] | None = None,
    backend: str = "auto",
) -> Float[Array, "b nb"]:
    """Column scores c_n with memory linear in T (equals ``column_scores(block_scores_reference)``):
    the column sums of :func:`block_tiles` (key blocks without a valid token score −inf)."""
    return column_scores(block_tiles(q, k, opts, valid=valid, backend=backend))


def select_blocks(
    column_scores: Float[Array, "b nb"],
    keep_ratio: float,
    block_size: int,
    *,
    n_valid_blocks: int | Int[Array, " b"] | None = None,
    seq_len: int | None = None,
    shards: int = 1,
) -> routing.Selection:
    """Keep the top ``floor(keep_ratio · n_b)`` blocks (static), as ascending token indices.

    Blocks scoring −inf (no valid token) and blocks at index ≥ ``n_valid_blocks`` (an int or one
    count per row) are invalid: never chosen while valid blocks remain, and invalid in all their
    token slots if they must fill the capacity. Token indices address the sequence padded to
    ``n_b · block_size``; with ``seq_len`` set, slots at positions ≥ ``seq_len`` (the padding tail
    of a partial last block) are marked invalid too, so they read nothing useful and write nothing.
    ``shards`` > 1 keeps ``ceil(k / shards)`` blocks in each sequence shard (``routing.per_shard``).
    """
    nb = column_scores.shape[-1]
    k_blocks = routing.capacity(nb, keep_ratio, rounding="floor")
    scores = jax.lax.stop_gradient(column_scores)
    valid_blocks = ~jnp.isneginf(scores)
    if n_valid_blocks is not None:
        limit = jnp.asarray(n_valid_blocks).reshape(-1, 1)
        valid_blocks = valid_blocks & (jnp.arange(nb)[None, :] < limit)
    sel = routing.block_topk_select(scores, block_size, k_blocks, valid_blocks, shards=shards)
    if seq_len is not None:
        sel = routing.Selection(sel.indices, sel.valid & (sel.indices < seq_len), sel.shards)
    return sel
