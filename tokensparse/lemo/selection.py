"""LeMo's block selection (the oracle score and the sparse layer): which 64-token blocks a sparse layer keeps.

A sparse layer keeps its top ``floor(ρ_l · n_b)`` blocks, scored from the layer's own input under
``stop_gradient`` by the rule ``LeMoConfig.selector`` names (:mod:`tokensparse.lemo.rules`: the
spec's oracle, its trained predictors, random, the exact query-side ``attention_ratio``, ...), with
block 0 forced in when ``keep_first_block``. :func:`lemo_router` is this as the layer loop's router
(:meth:`tokensparse.llama.Llama.run_layers`); :func:`layer_kinds` tells the loop which layers share
one rule and MLP setting, so that they run under one scan.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from tokensparse import routing
from tokensparse.config import LeMoConfig
from tokensparse.layer_loop import Layer
from tokensparse.lemo import predictor, rules, scoring
from tokensparse.lemo.rules import scoring_qk
from tokensparse.llama import DecoderBlock, Llama
from tokensparse.sharding import route_shards


class LayerKind(NamedTuple):
    """A layer's static setting in the LeMo loop (``Layer.kind``): layers of equal kinds share a
    scan. ``layer`` is the layer's own index for ``per_layer`` rules (None otherwise); ``mlp_keep``
    the channels its MLP backward keeps when ``mlp_drop_profile`` sets them per layer (None: the
    config's ``mlp_drop``)."""

    keep_ratio: float
    layer: int | None = None
    mlp_keep: int | None = None


def oracle_block_scores(block: DecoderBlock, u: Float[Array, "b t d"],
                        opts: scoring.ScoreOptions, positions=None) -> Float[Array, "b nb"]:
    """The oracle's column block scores of the normed input ``u``, no gradient (``positions`` are
    needed only with ``opts.post_rope``)."""
    if opts.post_rope and positions is None:
        raise ValueError("post-RoPE oracle scores need the positions.")
    return scoring.block_scores(*scoring_qk(block, u, positions, opts), opts)


def select_top(scores: Float[Array, "b nb"], keep_ratio: float, lemo: LeMoConfig
               ) -> routing.Selection:
    """The top ``floor(keep_ratio · n_b)`` blocks of ``scores`` as ascending token indices (block 0
    first when ``lemo.keep_first_block``; −inf blocks never while others remain)."""
    if lemo.keep_first_block:
        scores = scores.at[:, 0].set(jnp.where(jnp.isneginf(scores[:, 0]), -jnp.inf, jnp.inf))
    return scoring.select_blocks(scores, keep_ratio, lemo.block_size,
                                 shards=route_shards(lemo.route_shards))


def rule_selection(score: rules.ScoreFn, block: DecoderBlock, h: Float[Array, "b t d"],
                   layer: Layer, keep_ratio: float, lemo: LeMoConfig) -> routing.Selection:
    """The layer's selection by ``score`` (a bound rule) of its residual input ``h``."""
    return select_top(rules.layer_scores(score, block, h, layer, lemo), keep_ratio, lemo)


def layer_selection(block: DecoderBlock, u, keep_ratio: float, lemo: LeMoConfig,
                    layer_predictor: predictor.LayerPredictor | None = None, positions=None
                    ) -> routing.Selection:
    """The layer's top ``floor(keep_ratio · n_b)`` blocks of the normed input ``u``, by the given
    predictor's column scores, else by the oracle's (under ``lemo``'s score flags): the spec's two
    rules, for callers that have only ``u``. The router uses :func:`rule_selection`."""
    with jax.named_scope(rules.SCOPE):
        if layer_predictor is not None:
            scores = layer_predictor.column_scores(jax.lax.stop_gradient(u))
        else:
            scores = oracle_block_scores(block, u, scoring.ScoreOptions.from_lemo(lemo), positions)
    return select_top(scores, keep_ratio, lemo)


def layer_kinds(lemo: LeMoConfig, ratios: tuple[float, ...],
                mlp_keeps: tuple[int, ...] | None = None) -> tuple[LayerKind, ...]:
    """Each layer's :class:`LayerKind`. Layers of one keep ratio (and MLP setting) run under one
    scan; with a ``per_layer`` rule (one module per layer) every sparse layer is its own kind.
    ``mlp_keeps``: per-layer MLP backward channels (from ``mlp_drop_profile``)."""
    per_layer = rules.get(lemo.selector).per_layer
    return tuple(LayerKind(r, i if per_layer and r < 1.0 else None,
                           None if mlp_keeps is None else mlp_keeps[i])
                 for i, r in enumerate(ratios))


def lemo_router(model: Llama, lemo: LeMoConfig):
    """The layer loop's router: a layer's fixed selection when given (``layer.inputs``), else the
    top blocks by the config's rule of its residual input; None when the layer is dense."""
    score = rules.get(lemo.selector).scorer(model, lemo)

    def route(block, h, layer):
        if layer.kind.keep_ratio >= 1.0:
            return None
        if layer.inputs is not None:
            return layer.inputs
        return rule_selection(score, block, h, layer, layer.kind.keep_ratio, lemo)
    return route
