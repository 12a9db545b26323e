"""Attention for the eliminated blocks: the row's first block and their own (``LeMoConfig.eliminated``).

The spec passes an eliminated token through on the residual (``h = x``: ``eliminated="pass"``). It
thereby loses its own attention update as a query, which on SmolLM2 costs more than the keys it
takes from the others. With ``eliminated="sink_local"`` (the library's default) each eliminated
64-token block instead attends, causally, to the row's first block (the attention sink) and to
itself: ``2 · block_size`` keys per query, so the extra work is linear in the sequence length while
the kept blocks' attention stays quadratic in the kept length only. The kept blocks' attention is
unchanged: they still see only kept blocks, and eliminated blocks are seen by nothing but
themselves.

Measured on SmolLM2-135M, 1K held-out English windows, ``half`` schedule, zero training (the
sparse forward's loss above the dense one, keep 0.7 / 0.4): the exact attention-ratio rule +0.74 /
+2.44 nats passing eliminated blocks through, +0.19 / +0.42 with this fill; random blocks +0.94 /
+2.85 → +0.23 / +0.45. Either piece alone is far weaker (sink only +0.62, own block only +0.84 at
keep 0.7): a local-only softmax has nothing to put its attention-sink mass on.

The update runs under ``jax.checkpoint``: the backward keeps only the eliminated rows' input and
recomputes the q/k/v/o projections of those rows and their 2·block_size-key attention. Packed
rows: the sink is the row's first block, so a later document's blocks (another segment) see only
themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from tokensparse import routing
from tokensparse.llama import DecoderBlock
from tokensparse.remat import checkpointed


def kept_blocks(selection: routing.Selection, n_blocks: int) -> Bool[Array, "b nb"]:
    """Which of the row's ``n_blocks`` blocks a block selection keeps (its valid slots)."""
    blocks, valid = selection.blocks
    rows = jnp.arange(blocks.shape[0])[:, None]
    return jnp.zeros((blocks.shape[0], n_blocks), bool).at[rows, blocks].max(valid)


def complement(kept: Bool[Array, "b nb"], n_fill: int, block_size: int, *, shards: int = 1
               ) -> routing.Selection:
    """The first ``n_fill`` blocks that ``kept`` does not keep, as a block selection (per sequence
    shard with ``shards`` > 1, like the kept one). Slots past the eliminated blocks (a threshold
    rule that kept fewer than its capacity cannot; ``n_fill`` larger than the eliminated count) are
    invalid."""
    order = -jnp.arange(kept.shape[1], dtype=jnp.float32)  # earliest first
    scores = jnp.broadcast_to(order, kept.shape)
    return routing.block_topk_select(scores, block_size, n_fill, ~kept, shards=shards)


def eliminated_of(selection: routing.Selection, n_blocks: int) -> routing.Selection | None:
    """The blocks a LeMo layer's kept ``selection`` eliminates (every one of them); None when its
    capacity is every block (Algorithm 1's thresholds can keep a whole layer)."""
    if selection.block_size <= 1:
        raise ValueError("LeMoConfig.eliminated='sink_local' needs a block selection (one made by "
                         "routing.block_topk_select / expand_blocks); use eliminated='pass' with "
                         "token-level selections.")
    n_eliminated = n_blocks - selection.capacity // selection.block_size
    if n_eliminated == 0:
        return None
    return complement(kept_blocks(selection, n_blocks), n_eliminated, selection.block_size,
                      shards=selection.shards)


def _sink_local_rows(block: DecoderBlock, x_e, pos_e, seg_e, x_s, pos_s, seg_s):
    """Attention output of the gathered eliminated rows ``x_e`` ([b, e·bs, d], whole blocks) over
    the first block ``x_s`` ([b, bs, d]; ``seg_s`` per eliminated block, [b·e, bs]) and themselves."""
    b, bs = x_s.shape[0], x_s.shape[1]
    e = x_e.shape[1] // bs
    q, k, v = block.attn.project_qkv(block.input_norm(x_e), pos_e)
    _, k_s, v_s = block.attn.project_qkv(block.input_norm(x_s), pos_s)

    def per_block(a):  # [b, e·bs, ...] -> [b·e, bs, ...]
        return a.reshape(b * e, bs, *a.shape[2:])

    def with_sink(sink, own):  # [b, bs, ...], [b, e·bs, ...] -> [b·e, 2·bs, ...]
        sink = jnp.broadcast_to(sink[:, None], (b, e, *sink.shape[1:])).reshape(b * e, *sink.shape[1:])
        return jnp.concatenate([sink, per_block(own)], axis=1)

    out = block.attn.core(per_block(q), with_sink(k_s, k), with_sink(v_s, v), per_block(pos_e),
                          per_block(seg_e), with_sink(pos_s, pos_e),
                          jnp.concatenate([seg_s, per_block(seg_e)], axis=1))
    return block.attn.project_out(out.reshape(q.shape))


def sink_local(block: DecoderBlock, x: Float[Array, "b t d"], positions: Int[Array, "b t"],
               segment_ids: Int[Array, "b t"] | None, eliminated: routing.Selection
               ) -> Float[Array, "b t d"]:
    """``x`` plus, at the ``eliminated`` blocks' rows, the attention output of each such block over
    the row's first block and itself (causal by position; other rows unchanged). The backward
    keeps only the eliminated rows' input and recomputes the rest."""
    bs = eliminated.block_size
    if segment_ids is None:
        segment_ids = jnp.zeros(positions.shape, jnp.int32)
    # Block 0 eliminated (keep_first_block=False) is its own sink: mask the duplicate keys.
    is_first = eliminated.blocks[0] == 0  # [b, e]
    seg_s = jnp.where(is_first[..., None], -2, segment_ids[:, None, :bs]).reshape(-1, bs)
    a = checkpointed(_sink_local_rows)(
        block, routing.gather(x, eliminated), routing.gather(positions, eliminated),
        routing.gather(segment_ids, eliminated), x[:, :bs], positions[:, :bs], seg_s)
    return routing.scatter_add(x, eliminated, a)


def reference(block: DecoderBlock, x: Float[Array, "b t d"], positions: Int[Array, "b t"],
              kept: Bool[Array, "b nb"], block_size: int, segment_ids=None) -> Float[Array, "b t d"]:
    """Dense masked reference of a LeMo attention sub-layer with this fill (tests): one [t, t] mask
    per row, kept rows over kept rows, eliminated rows over the first block and their own."""
    t = x.shape[1]
    seg = jnp.zeros(positions.shape, jnp.int32) if segment_ids is None else segment_ids
    q, k, v = block.attn.project_qkv(block.input_norm(x), positions)
    kept_t = jnp.repeat(kept, block_size, axis=1)
    blk = jnp.arange(t) // block_size
    causal = positions[:, :, None] >= positions[:, None, :]
    same = seg[:, :, None] == seg[:, None, :]
    local = (blk[:, None] == blk[None, :]) | (blk[None, :] == 0)
    mask = causal & same & jnp.where(kept_t[:, :, None], kept_t[:, None, :], local[None])
    h, hk = q.shape[2], k.shape[2]
    qg = q.reshape(*q.shape[:2], hk, h // hk, q.shape[-1])
    s = jnp.einsum("bqgrd,bkgd->bgrqk", qg, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -jnp.inf), axis=-1)
    out = jnp.einsum("bgrqk,bkgd->bqgrd", p.astype(v.dtype), v).reshape(q.shape)
    return x + block.attn.project_out(out)
