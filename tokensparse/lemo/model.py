"""LeMo forward pass: per-layer contextual token elimination on a LoRA-adapted Llama (spec §2.5).

In a sparse layer l the attention sub-layer runs only on the top ``floor(ρ_l · n_b)`` 64-token blocks
(scored from the layer's own normed input under stop_gradient, by the oracle or, with
``selector="predictor"``, by ``model.lemo_predictors``), at their original positions; the
other tokens pass through on the residual (h = x exactly). The MLP runs on every token, with an exact
forward and, by default, a backward through only the top 20% channels (spec §2.6). The next layer
re-scores all tokens: elimination is per layer, not permanent. Evaluation is dense (the plain model
with the trained LoRA).
"""

from __future__ import annotations

import functools

import jax
from jaxtyping import Array, Float, Int

from tokensparse import lora, routing, train
from tokensparse.config import LeMoConfig
from tokensparse.lemo import predictor, scoring
from tokensparse.lemo.mlp import keep_channels, recomputed_mlp, sparse_backward_mlp
from tokensparse.llama import DecoderBlock, Llama
from tokensparse.remat import tag
from tokensparse.sharding import route_shards


def check_lemo(model: Llama, lemo: LeMoConfig, seq_len: int) -> tuple[float, ...]:
    """Validate a LeMo run before compiling; returns the per-layer keep ratios."""
    if seq_len % lemo.block_size:
        raise ValueError(f"LeMo needs the sequence length ({seq_len}) to be a multiple of the block "
                         f"size ({lemo.block_size}); change train.seq_len or lemo.block_size.")
    if not lora.has_lora(model):
        raise ValueError("LeMo fine-tunes LoRA adapters, but the model has none: call "
                         "tokensparse.lora.add_lora(model, ...) first.")
    ratios = lemo.keep_ratios(len(model.layers))
    if lemo.selector == "predictor":
        predictors = predictor.attached(model)
        if predictors is None:
            raise ValueError("LeMoConfig.selector='predictor' needs trained predictors on the model: "
                             "tokensparse.lemo.predictor.attach(model, load_predictors(...)), or "
                             "--config.lemo.predictors=DIR in experiments.finetune; or use "
                             "selector='oracle'.")
        missing = [i for i, r in enumerate(ratios) if r < 1.0 and predictors.for_layer(i) is None]
        if missing:
            raise ValueError(f"layers {missing} are sparse but have no predictor (predictors cover "
                             f"{predictors.layer_ids}); train predictors for them or change the "
                             "schedule.")
        if predictors.block_size != lemo.block_size:
            raise ValueError(f"the predictors score {predictors.block_size}-token blocks; "
                             f"LeMoConfig.block_size is {lemo.block_size}.")
    if lemo.mlp_mode == "channel_sparse_bwd":
        for start, group in zip(model.layers.starts, model.layers.groups, strict=True):
            if any(getattr(group.mlp, p).adapter is not None
                   for p in ("gate_proj", "up_proj", "down_proj")):
                raise ValueError(f"layer {start} has LoRA on its MLP; LeMo's channel-sparse MLP "
                                 "backward needs frozen MLP weights (use lemo.mlp_mode='dense').")
    return ratios


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


def lemo_block(block: DecoderBlock, h, positions, segment_ids, selection=None, *,
               mlp_mode: str = "dense", mlp_keep: int | None = None):
    """One decoder layer with LeMo's MLP backward; attention runs on ``selection`` (None: dense).

    ``mlp_mode`` (``LeMoConfig.mlp_mode``): ``"channel_sparse_bwd"`` keeps ``mlp_keep`` channels
    in the backward (all I of them: the ordinary MLP); ``"recompute"`` is the exact backward from
    the MLP's input alone (:func:`recomputed_mlp`); ``"dense"`` the ordinary MLP. The caller picks
    the blocks (:func:`layer_selection`, or Algorithm 1's thresholds) outside any remat region, so
    recomputation never re-scores."""
    h = tag(h, "block_in")
    h, normed = block.attend_and_norm(h, positions, segment_ids, selection)
    if mlp_mode == "recompute":
        return block.feed_forward(h, normed, functools.partial(recomputed_mlp, block.mlp))
    if mlp_mode == "channel_sparse_bwd" and mlp_keep < block.mlp.gate_proj.kernel.shape[1]:
        return block.feed_forward(h, normed, functools.partial(sparse_backward_mlp, block.mlp,
                                                               keep=mlp_keep))
    return block.feed_forward(h, normed)


def mlp_keep_channels(model: Llama, lemo: LeMoConfig) -> int:
    """Channels the MLP backward keeps: all of them unless ``mlp_mode="channel_sparse_bwd"``."""
    ffn_dim = model.config.ffn_dim
    if lemo.mlp_mode != "channel_sparse_bwd":
        return ffn_dim
    return keep_channels(ffn_dim, lemo.mlp_drop)


def lemo_block_fn(model: Llama, lemo: LeMoConfig):
    """:func:`lemo_block` with ``lemo``'s MLP backward bound: ``fn(block, h, positions,
    segment_ids, selection)``."""
    return functools.partial(lemo_block, mlp_mode=lemo.mlp_mode,
                             mlp_keep=mlp_keep_channels(model, lemo))


def lemo_layer_fn(model: Llama, lemo: LeMoConfig):
    """:func:`lemo_block` as a :meth:`~tokensparse.llama.Llama.run_layers` layer function."""
    run = lemo_block_fn(model, lemo)

    def layer_fn(block, h, layer, selection):
        return run(block, h, layer.positions, layer.segment_ids, selection), None
    return layer_fn


def layer_kinds(lemo: LeMoConfig, ratios: tuple[float, ...]) -> tuple[tuple, ...]:
    """Each layer's kind for the layer loop: ``(keep_ratio, predictor layer or None)``. Layers of
    one keep ratio run under one scan; with learned predictors (one module per layer) every
    sparse layer is its own kind."""
    per_layer = lemo.selector == "predictor"
    return tuple((r, i if per_layer and r < 1.0 else None) for i, r in enumerate(ratios))


def group_layers(model: Llama, lemo: LeMoConfig) -> Llama:
    """Regroup ``model``'s stacked layers to match ``lemo``'s schedule (in place, outside ``jit``,
    before building an optimizer), so that no scan over a run of layers slices (copies) weights."""
    model.layers.regroup_for(layer_kinds(lemo, lemo.keep_ratios(len(model.layers))))
    return model


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


def lemo_hidden_states(model: Llama, tokens: Int[Array, "b t"], positions=None, segment_ids=None,
                       *, lemo: LeMoConfig, selections=None) -> Float[Array, "b t d"]:
    """Final-normed hidden states of the LeMo forward (the loss applies the head).

    ``selections`` (one per layer; used for the sparse ones) replaces the selector: fixed blocks, at
    no selection cost (benchmarks use it to price selection)."""
    ratios = check_lemo(model, lemo, tokens.shape[1])
    if selections is not None and len(selections) != len(ratios):
        raise ValueError(f"selections has {len(selections)} entries; the model has {len(ratios)} "
                         "layers.")
    inputs = None if selections is None else [s if r < 1.0 else None
                                               for s, r in zip(selections, ratios, strict=True)]
    return model.hidden_states(tokens, positions, segment_ids, layer_fn=lemo_layer_fn(model, lemo),
                               router=lemo_router(model, lemo), kinds=layer_kinds(lemo, ratios),
                               inputs=inputs)


def lemo_loss(model: Llama, batch, *, lemo: LeMoConfig, loss_segment: int = 0, selections=None,
              layout=None):
    """:func:`tokensparse.train.lm_loss` with the LeMo forward (``layout``: see there; its chunks
    must be whole blocks)."""
    hidden_fn = functools.partial(lemo_hidden_states, lemo=lemo, selections=selections)
    return train.lm_loss(model, batch, loss_segment=loss_segment, hidden_fn=hidden_fn, layout=layout)
