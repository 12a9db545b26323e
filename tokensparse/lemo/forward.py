"""LeMo's forward pass: per-layer contextual token elimination on a LoRA-adapted Llama.

In a sparse layer l the attention sub-layer runs only on the blocks :mod:`tokensparse.lemo.selection`
keeps, at their original positions; the other blocks attend only to the row's first block and to
themselves (``LeMoConfig.eliminated="sink_local"``, :mod:`tokensparse.lemo.fill`) or, as in the
spec (``"pass"``), pass through on the residual (h = x exactly).
The MLP runs on every token, with an exact forward and, by default, a backward through only the top
20% channels (:mod:`tokensparse.lemo.mlp`). The next layer re-scores all tokens:
elimination is per layer, not permanent. Evaluation is dense (the plain model with the trained
LoRA). The forward is the model's own layer loop with LeMo's router and layer function.
"""

from __future__ import annotations

import functools

from jaxtyping import Array, Float, Int

from tokensparse import lora, train
from tokensparse.config import LeMoConfig
from tokensparse.data.batching import Batch
from tokensparse.lemo import fill, predictor, rules
from tokensparse.lemo.mlp import keep_channels, recomputed_mlp, sparse_backward_mlp
from tokensparse.lemo.offload import model_remat_for
from tokensparse.lemo.selection import layer_kinds, lemo_router
from tokensparse.lemo.two_d import two_d_core
from tokensparse.llama import DecoderBlock, Llama
from tokensparse.remat import tag


def check_lemo(model: Llama, lemo: LeMoConfig, seq_len: int, *, training: bool = True
               ) -> tuple[float, ...]:
    """Validate a LeMo run before compiling; returns the per-layer keep ratios. ``training=False``
    (a forward only) accepts a model without LoRA adapters."""
    if seq_len % lemo.block_size:
        raise ValueError(f"LeMo needs the sequence length ({seq_len}) to be a multiple of the block "
                         f"size ({lemo.block_size}); change train.seq_len or lemo.block_size.")
    if training and not lora.has_lora(model):
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
    rule = rules.get(lemo.selector)
    if rule.check is not None:
        rule.check(model, lemo, ratios)
    if lemo.mlp_drop_profile is not None and len(lemo.mlp_drop_profile) != len(ratios):
        raise ValueError(f"LeMoConfig.mlp_drop_profile has {len(lemo.mlp_drop_profile)} entries; "
                         f"the model has {len(ratios)} layers.")
    if lemo.mlp_mode == "channel_sparse_bwd":
        for start, group in zip(model.layers.starts, model.layers.groups, strict=True):
            if any(getattr(group.mlp, p).adapter is not None
                   for p in ("gate_proj", "up_proj", "down_proj")):
                raise ValueError(f"layer {start} has LoRA on its MLP; LeMo's channel-sparse MLP "
                                 "backward needs frozen MLP weights (use lemo.mlp_mode='dense').")
    return ratios


def lemo_block(block: DecoderBlock, h, positions, segment_ids, selection=None, *,
               mlp_mode: str = "dense", mlp_keep: int | None = None, two_d: bool = False,
               eliminated: str = "pass"):
    """One decoder layer with LeMo's MLP backward; attention runs on ``selection`` (None: dense),
    and with ``two_d`` (``LeMoConfig.two_d``) a sparse layer's attention is shifted sparse attention
    over its kept tokens (:mod:`tokensparse.lemo.two_d`). ``eliminated="sink_local"``
    (``LeMoConfig.eliminated``): the other blocks attend to the first block and themselves
    (:mod:`tokensparse.lemo.fill`); ``"pass"``: they pass through.

    ``mlp_mode`` (``LeMoConfig.mlp_mode``): ``"channel_sparse_bwd"`` keeps ``mlp_keep`` channels
    in the backward (all I of them: the ordinary MLP); ``"recompute"`` is the exact backward from
    the MLP's input alone (:func:`recomputed_mlp`); ``"dense"`` the ordinary MLP. The caller picks
    the blocks (:func:`layer_selection`, or Algorithm 1's thresholds) outside any remat region, so
    recomputation never re-scores."""
    h = tag(h, "block_in")
    if eliminated == "sink_local" and selection is not None:
        others = fill.eliminated_of(selection, h.shape[1] // selection.block_size)
        if others is not None:
            h = fill.sink_local(block, h, positions, segment_ids, others)
    core = two_d_core(block.attn) if two_d and selection is not None else None
    h, normed = block.attend_and_norm(h, positions, segment_ids, selection, core=core)
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


def mlp_keeps(model: Llama, lemo: LeMoConfig) -> tuple[int, ...] | None:
    """Per-layer MLP backward channels from ``lemo.mlp_drop_profile`` (None without one)."""
    if lemo.mlp_drop_profile is None or lemo.mlp_mode != "channel_sparse_bwd":
        return None
    return tuple(keep_channels(model.config.ffn_dim, p) for p in lemo.mlp_drop_profile)


def lemo_kinds(model: Llama, lemo: LeMoConfig, ratios: tuple[float, ...]):
    """The layer loop's kinds for ``lemo`` (:func:`tokensparse.lemo.selection.layer_kinds`)."""
    return layer_kinds(lemo, ratios, mlp_keeps(model, lemo))


def lemo_block_fn(model: Llama, lemo: LeMoConfig):
    """:func:`lemo_block` with ``lemo``'s MLP backward bound: ``fn(block, h, positions,
    segment_ids, selection)``."""
    return functools.partial(lemo_block, mlp_mode=lemo.mlp_mode,
                             mlp_keep=mlp_keep_channels(model, lemo), two_d=lemo.two_d,
                             eliminated=lemo.eliminated)


def lemo_layer_fn(model: Llama, lemo: LeMoConfig):
    """:func:`lemo_block` as a :meth:`~tokensparse.llama.Llama.run_layers` layer function."""
    run = lemo_block_fn(model, lemo)

    def layer_fn(block, h, layer, selection):
        keep = getattr(layer.kind, "mlp_keep", None)  # per layer with mlp_drop_profile
        fn = run if keep is None else functools.partial(lemo_block, mlp_mode=lemo.mlp_mode,
                                                        mlp_keep=keep, two_d=lemo.two_d,
                                                        eliminated=lemo.eliminated)
        return fn(block, h, layer.positions, layer.segment_ids, selection), None
    return layer_fn


def group_layers(model: Llama, lemo: LeMoConfig) -> Llama:
    """Regroup ``model``'s stacked layers to match ``lemo``'s schedule (in place, outside ``jit``,
    before building an optimizer), so that no scan over a run of layers slices (copies) weights."""
    model.layers.regroup_for(lemo_kinds(model, lemo, lemo.keep_ratios(len(model.layers))))
    return model


def lemo_hidden_states(model: Llama, tokens: Int[Array, "b t"], positions=None, segment_ids=None,
                       *, lemo: LeMoConfig, selections=None, training: bool = True
                       ) -> Float[Array, "b t d"]:
    """Final-normed hidden states of the LeMo forward (the loss applies the head).

    ``selections`` (one per layer; used for the sparse ones) replaces the selector: fixed blocks, at
    no selection cost (benchmarks use it to price selection). ``training=False``: see
    :func:`check_lemo`."""
    ratios = check_lemo(model, lemo, tokens.shape[1], training=training)
    if selections is not None and len(selections) != len(ratios):
        raise ValueError(f"selections has {len(selections)} entries; the model has {len(ratios)} "
                         "layers.")
    inputs = None if selections is None else [s if r < 1.0 else None
                                               for s, r in zip(selections, ratios, strict=True)]
    kinds = lemo_kinds(model, lemo, ratios)
    return model.hidden_states(tokens, positions, segment_ids, layer_fn=lemo_layer_fn(model, lemo),
                               router=lemo_router(model, lemo), kinds=kinds, inputs=inputs,
                               remat_for=model_remat_for(model, lemo, ratios, kinds, *tokens.shape))


def lemo_loss(model: Llama, batch, *, lemo: LeMoConfig, loss_segment: int = 0, selections=None,
              layout=None):
    """:func:`tokensparse.train.lm_loss` with the LeMo forward (``layout``: see there; its chunks
    must be whole blocks)."""
    hidden_fn = functools.partial(lemo_hidden_states, lemo=lemo, selections=selections)
    return train.lm_loss(model, batch, loss_segment=loss_segment, hidden_fn=hidden_fn, layout=layout)


def sparse_forward_loss(model: Llama, tokens: Int[Array, "b t"], lemo: LeMoConfig, *,
                        positions=None, segment_ids=None) -> Float[Array, ""]:
    """Mean next-token cross entropy of the LeMo sparse forward, with no training: every sparse
    layer selects from its own input inside the forward. The model needs no adapters (a LoRA with
    B = 0 gives the same). How much elimination alone costs a model; dense equals
    :func:`tokensparse.train.lm_loss`."""
    batch = Batch(tokens, positions, segment_ids)  # lm_loss fills in default positions
    hidden_fn = functools.partial(lemo_hidden_states, lemo=lemo, training=False)
    return train.lm_loss(model, batch, hidden_fn=hidden_fn)[0]
