"""LeMo block informativeness (the oracle score): which 64-token blocks receive the most attention mass.

For query heads h, tokens i (query) and j (key)::

    A_ij     = Σ_h ReLU(q_ih · k_jh)            (optionally · 1/√d and / H)
    tile[m,n] = max_{i ∈ block m, j ∈ block n} A_ij / normalizer
    c_n      = Σ_m tile[m, n]                    (the block's column score)

Only positive per-head logits count, so negative logits cannot cancel positive ones; max-pooling
keeps a whole block alive for one important token. The defaults are the artifact's *target kernel*
(no 1/√d, no /H, no causal mask, diagonal included, /1024 = 64·16).

**Pre- or post-RoPE is decided by the caller**: these functions score whatever q, k they are given.
The library default (``ScoreOptions.post_rope=False``, recorded with every result) is to pass the
per-head projections *before* RoPE, as the artifact does; ``LeMoConfig.score_post_rope=True`` makes
selection and predictor targets pass the rotated ones (:func:`tokensparse.lemo.rules.scoring_qk`).

**Padding** (a library choice): T need not be a multiple of ``block_size``; the sequence is padded up to
``n_b = ceil(T / block_size)`` blocks. Padding tokens, and tokens with ``valid=False``, contribute
nothing: every entry A_ij with an invalid i or j is 0 (it never raises a tile max, and a tile with
no valid entry is 0). A key block with no valid token at all scores −inf, so top-k never picks
it while real blocks remain (a partially padded last block is a real block).

Scores drive a discrete selection and carry no gradient (:func:`block_scores` stops it). Cost is
O(H·T²·d), like attention, so use them for predictor targets, recall and ``selector="oracle"``, not
in the default training hot path.

The dense definition is ``kernels_pallas.reference.block_scores_reference`` (wrapped here with
:class:`ScoreOptions`). :func:`block_tiles` dispatches through :mod:`tokensparse.backends` (kind
``"block_scores"``): ``"xla"`` (a scan, any platform), ``"pallas"`` (the kernel), ``"auto"``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import block_scores as _kernel
from kernels_pallas import reference as _ref
from kernels_pallas.reference import num_blocks as num_blocks  # re-exported
from tokensparse import backends as _registry
from tokensparse import routing

KIND = "block_scores"


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """Which variant of the block score to compute (every result should record these flags).

    A static pytree node, so it can be passed straight into ``jax.jit``-ed functions.

    - ``scale_by_sqrt_d``: multiply logits by 1/√head_dim (the artifact's ablation oracle).
    - ``divide_by_heads``: average instead of sum over heads (the paper's A_ij).
    - ``causal``: only tiles with query block m ≥ key block n contribute (tile-level mask; the
      diagonal tile is whole). The default ranks the whole sequence, future queries included
      (non-causal, faithful to the published method).
    - ``exclude_diagonal``: drop the token-level entries i == j (the paper's Σ_{i≠j}); the artifact
      includes them.
    - ``normalizer``: divides every tile (the artifact's 1024 = 64·16); ranking is unaffected.
    - ``post_rope``: not read by these functions (they score whatever q, k they get): tells the
      caller whether to pass rotated q, k (default: no; :func:`tokensparse.lemo.rules.scoring_qk`
      honours it).

    :meth:`from_lemo` builds them from a :class:`~tokensparse.config.LeMoConfig`'s ``score_*``
    fields, the one place selection, Algorithm 1 and predictor targets take them from.
    """

    block_size: int = 64
    scale_by_sqrt_d: bool = False
    divide_by_heads: bool = False
    causal: bool = False
    exclude_diagonal: bool = False
    normalizer: float = 1024.0
    post_rope: bool = False

    @classmethod
    def from_lemo(cls, lemo) -> ScoreOptions:
        """The options of a ``LeMoConfig``: its ``block_size`` and ``score_*`` flags."""
        return cls(block_size=lemo.block_size, scale_by_sqrt_d=lemo.score_scale_by_sqrt_d,
                   divide_by_heads=lemo.score_divide_by_heads, causal=lemo.score_causal,
                   exclude_diagonal=lemo.score_exclude_diagonal, post_rope=lemo.score_post_rope)

    def to_dict(self) -> dict:
        """The flags as plain data (recorded with results and target caches)."""
        return dataclasses.asdict(self)

    def __post_init__(self):
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"ScoreOptions.block_size={self.block_size!r} must be a positive int.")
        if not self.normalizer > 0:
            raise ValueError(f"ScoreOptions.normalizer={self.normalizer} must be positive.")


def _logit_factor(opts: ScoreOptions, heads: int, head_dim: int) -> float:
    return (1.0 / math.sqrt(head_dim) if opts.scale_by_sqrt_d else 1.0) / (
        heads if opts.divide_by_heads else 1.0)


def block_scores_reference(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b t hkv d"],
    opts: ScoreOptions | None = None,
    *,
    valid: Bool[Array, "b t"] | None = None,
) -> Float[Array, "b nb nb"]:
    """The tile matrix ``tile[b, m, n]`` (query block m, key block n), densely: the definition in
    ``kernels_pallas.reference`` under ``opts``.

    Materialises the [B, H, T, T] logits: for tests and small inputs only. Columns of key blocks
    without a valid token are −inf, so :func:`column_scores` gives them −inf.
    """
    opts = opts or ScoreOptions()
    return _ref.block_scores_reference(
        q, k, block_size=opts.block_size, valid=valid,
        scale=_logit_factor(opts, q.shape[2], q.shape[3]), normalizer=opts.normalizer,
        causal=opts.causal, exclude_diagonal=opts.exclude_diagonal)


def column_scores(tiles: Float[Array, "b nb nb"]) -> Float[Array, "b nb"]:
    """c_n = Σ_m tile[m, n]: the block score of key block n."""
    return jnp.sum(tiles, axis=1)


def _pallas_tiles(q, k, opts: ScoreOptions, valid):
    """:func:`block_tiles`' ``"pallas"`` backend: the kernel, plus the −inf of empty key columns."""
    factor = _logit_factor(opts, q.shape[2], q.shape[3])
    tiles = _kernel.block_tiles(q, k, block_size=opts.block_size, valid=valid,
                                scale=factor / opts.normalizer, causal=opts.causal,
                                exclude_diagonal=opts.exclude_diagonal,
                                interpret=_ref.platform_target(("triton",)).interpret)
    mask = _ref.block_token_mask(valid, q.shape[0], q.shape[1], opts.block_size)
    return _ref.empty_columns_neginf(tiles, mask, opts.block_size)


def _pallas_supports(q, k, opts: ScoreOptions) -> str | None:
    return _kernel.supports(q, k, block_size=opts.block_size)


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
    on-chip memory; named where it cannot run, it raises ``ValueError``. ``"auto"`` picks the kernel
    where it runs, else the scan (:func:`resolve` says which). Computed in fp32 under
    ``stop_gradient``.
    """
    opts = opts or ScoreOptions()
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    return _registry.get(KIND, resolve(backend, q, k, opts)).fn(q, k, opts, valid)


def _scan_tiles(q, k, opts: ScoreOptions, valid):
    """:func:`block_tiles`' ``"xla"`` backend: one query block per ``lax.scan`` step."""
    q, k, valid = _ref.pad_to_blocks(q, k, valid, opts.block_size)
    bsz, tp, h, d = q.shape
    factor = _logit_factor(opts, h, d)
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
    return _ref.empty_columns_neginf(rows.transpose(1, 0, 2), valid, bs)


_registry.define(KIND, fallback="xla")
_registry.register(KIND, "xla", _registry.Backend(_scan_tiles))
_registry.register(KIND, "pallas", _registry.Backend(_pallas_tiles, supports=_pallas_supports,
                                                     priority=10))


def resolve(backend: str, q, k, opts: ScoreOptions | None = None) -> str:
    """The backend :func:`block_tiles` runs for ``backend`` on these q, k (arrays or
    ``jax.ShapeDtypeStruct`` s); raises ``ValueError`` for a named backend that cannot run them."""
    return _registry.resolve(KIND, backend, q, k, opts or ScoreOptions())


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
