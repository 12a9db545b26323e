"""The selection benchmark's loss shortcuts, free of flags (tests import them): per-row losses of the
LeMo sparse forward run from the first sparse layer's input, compacted (the library's forward) or
as the spec's masked reference, one compiled program for every keep ratio."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tokensparse import train
from tokensparse.config import LeMoConfig
from tokensparse.lemo import fill, rules
from tokensparse.lemo.forward import lemo_kinds, lemo_layer_fn
from tokensparse.lemo.selection import lemo_router
from tokensparse.llama import Llama, default_positions


def row_losses(model: Llama, hidden, tokens, lemo: LeMoConfig, start: int):
    """Per-row mean next-token loss of the LeMo sparse forward run from ``hidden``, layer
    ``start``'s input (the layers before it must be dense in ``lemo``)."""
    ratios = lemo.keep_ratios(len(model.layers))
    positions = default_positions(tokens)
    h, _ = model.run_layers(hidden, positions, layer_fn=lemo_layer_fn(model, lemo),
                            router=lemo_router(model, lemo), kinds=lemo_kinds(model, lemo, ratios),
                            start=start)
    return _per_row_loss(model, h, tokens)


def masked_row_losses(model: Llama, hidden, tokens, lemo: LeMoConfig, start: int, k_blocks):
    """:func:`row_losses` with the spec's masked reference of each sparse layer instead of the
    compacted one (the two are equal, as tested): the rule's top ``k_blocks`` blocks (a traced int, so
    one compiled program serves every keep ratio; ``n_b`` keeps all: the dense forward) attend among
    themselves, the other tokens see nothing and are seen by nothing: they pass through, or with
    ``lemo.eliminated="sink_local"`` get that fill (:mod:`tokensparse.lemo.fill`) first
    (``lemo.keep_ratio`` only marks the sparse layers)."""
    ratios = lemo.keep_ratios(len(model.layers))
    positions = default_positions(tokens)
    score = rules.get(lemo.selector).scorer(model, lemo)
    bs = lemo.block_size

    def layer_fn(block, h, layer, _):
        if layer.kind.keep_ratio >= 1.0:
            return block(h, layer.positions, layer.segment_ids), None
        scores = rules.layer_scores(score, block, h, layer, lemo)
        if lemo.keep_first_block:
            scores = scores.at[:, 0].set(jnp.inf)
        order = jnp.argsort(-scores, axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1, stable=True)
        kept_blocks = rank < k_blocks
        if lemo.eliminated == "sink_local":  # every block a candidate: n_b is static, k_blocks not
            others = fill.complement(kept_blocks, kept_blocks.shape[1], bs)
            h = fill.sink_local(block, h, layer.positions, None, others)
        kept = jnp.repeat(kept_blocks, bs, axis=1)[:, :h.shape[1]]
        seg = jnp.where(kept, 0, -1).astype(jnp.int32)
        return block.feed_forward(block.attend(h, layer.positions, seg)), None

    h, _ = model.run_layers(hidden, positions, layer_fn=layer_fn,
                            kinds=lemo_kinds(model, lemo, ratios), start=start)
    return _per_row_loss(model, h, tokens)


def _per_row_loss(model: Llama, h, tokens):
    h = model.final_norm(h)
    targets, weights = train.next_token_targets(tokens, None)

    def one(args):
        hr, tr, wr = args
        total = train.cross_entropy_sum(model.head(hr[None]), tr[None], wr[None])
        return total / jnp.maximum(wr.sum(), 1.0)
    return jax.lax.map(one, (h, targets, weights))


def prefix(model: Llama, tokens, stop: int):
    """The residual stream entering layer ``stop`` of the dense forward."""
    h, _ = model.run_layers(model.embed(tokens), default_positions(tokens), stop=stop)
    return h


def first_sparse(lemo: LeMoConfig, n_layers: int) -> int:
    ratios = lemo.keep_ratios(n_layers)
    return min((i for i, r in enumerate(ratios) if r < 1.0), default=n_layers)
