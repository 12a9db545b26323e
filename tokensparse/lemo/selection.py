"""LeMo's block selection (spec §2.2, §2.5): which 64-token blocks a sparse layer keeps.

A sparse layer keeps its top ``floor(ρ_l · n_b)`` blocks, scored from the layer's own normed input
under ``stop_gradient``: by the oracle (Σ over heads of ReLU(q·kᵀ) on pre-RoPE q, k, tile max,
column sums; :mod:`tokensparse.lemo.scoring`) or, with ``selector="predictor"``, by the layer's
trained predictor. :func:`lemo_router` is this rule as the layer loop's router
(:meth:`tokensparse.llama.Llama.run_layers`); :func:`layer_kinds` tells the loop which layers share
one rule, so that they run under one scan.
"""

from __future__ import annotations

import jax
from jaxtyping import Array, Float

from tokensparse import routing
from tokensparse.config import LeMoConfig
from tokensparse.lemo import predictor, scoring
from tokensparse.llama import DecoderBlock, Llama
from tokensparse.sharding import route_shards


def pre_rope_qk(block: DecoderBlock, u: Float[Array, "b t d"]) -> tuple[Array, Array]:
    """The layer's per-head q [B, T, H, D] and k [B, T, Hkv, D] before RoPE (with its current LoRA),
    from ``stop_gradient(u)``: what the oracle scores and the predictor targets are made of."""
    u = jax.lax.stop_gradient(u)
    b, t, _ = u.shape
    attn = block.attn
    q = attn.q_proj(u).reshape(b, t, attn.n_heads, attn.head_dim)
    k = attn.k_proj(u).reshape(b, t, attn.n_kv_heads, attn.head_dim)
    return q, k


def oracle_block_scores(block: DecoderBlock, u: Float[Array, "b t d"],
                        opts: scoring.ScoreOptions) -> Float[Array, "b nb"]:
    """Column block scores from the layer's own pre-RoPE q, k, no gradient."""
    return scoring.block_scores(*pre_rope_qk(block, u), opts)


def layer_selection(block: DecoderBlock, u, keep_ratio: float, lemo: LeMoConfig,
                    layer_predictor: predictor.LayerPredictor | None = None) -> routing.Selection:
    """The layer's top ``floor(keep_ratio · n_b)`` blocks, ascending, by the predictor's column
    scores when given, else by the oracle's (both under stop_gradient)."""
    if layer_predictor is not None:
        scores = layer_predictor.column_scores(u)
    else:
        scores = oracle_block_scores(block, u, scoring.ScoreOptions(block_size=lemo.block_size))
    if lemo.keep_first_block:
        scores = scores.at[:, 0].set(jax.numpy.inf)
    return scoring.select_blocks(scores, keep_ratio, lemo.block_size,
                                 shards=route_shards(lemo.route_shards))


def layer_kinds(lemo: LeMoConfig, ratios: tuple[float, ...]) -> tuple[tuple, ...]:
    """Each layer's kind for the layer loop: ``(keep_ratio, predictor layer or None)``. Layers of
    one keep ratio run under one scan; with learned predictors (one module per layer) every
    sparse layer is its own kind."""
    per_layer = lemo.selector == "predictor"
    return tuple((r, i if per_layer and r < 1.0 else None) for i, r in enumerate(ratios))


def lemo_router(model: Llama, lemo: LeMoConfig):
    """The layer loop's router: a layer's fixed selection when given (``layer.inputs``), else the
    top blocks by the predictor's or the oracle's scores of its normed input; None when dense."""
    predictors = predictor.attached(model) if lemo.selector == "predictor" else None

    def route(block, h, layer):
        ratio, predictor_layer = layer.kind
        if ratio >= 1.0:
            return None
        if layer.inputs is not None:
            return layer.inputs
        u = block.input_norm(jax.lax.stop_gradient(h))
        layer_predictor = None if predictor_layer is None else predictors.for_layer(predictor_layer)
        return layer_selection(block, u, ratio, lemo, layer_predictor)
    return route
