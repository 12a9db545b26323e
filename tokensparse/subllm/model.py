"""The SUBLLM model (NNX): a Llama backbone whose middle layers run on learned token subsets.

SUBLLM's training forward (the spec: the published method, see docs/subllm.md#sources). The forward walks the
parsed structure with a stack: at ``(`` the scorer picks a static-capacity subset (train: top-k + discard
penalty; infer: first-come threshold), the hidden states, positions and segment ids are gathered; at ``)`` the
short stream is upsampled into the stream saved at ``(`` and mixed with it by the bypass. Positions travel
with the tokens, so RoPE always sees original positions (composed across levels) and padding slots (segment
−1) see nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tokensparse import routing
from tokensparse.layer_loop import residual
from tokensparse.llama import Llama, default_positions, shard_residual
from tokensparse.sharding import route_shards
from tokensparse.subllm.balancer import balance
from tokensparse.subllm.modules import (
    BYPASS_LIMIT_PROB,
    Bypass,
    Scorer,
    balancer_grad_scale,
    balancer_prob,
    coin,
    infer_select,
    key_bias,
    key_biased_attention,
    train_select,
    upsample,
)
from tokensparse.subllm.structure import SubLLMConfig, parse_structure

MODES = ("train", "infer", "topk")


class SubLLM(Llama):
    """``model(tokens, positions=None, segment_ids=None, *, mode, step, rng) -> logits [B, T, V]``.

    ``self.config`` is the backbone :class:`~tokensparse.config.ModelConfig` (so the generic training
    helpers apply); ``self.subllm_config`` the full :class:`SubLLMConfig`. Modes:

    - ``"train"``: top-k at the training capacity with the discard penalty, Balancer and bypass limit;
      needs ``rng`` (their per-call coins) and ``step`` (their schedules). Without a ``step`` the
      schedules take the spec's defaults (icefall's ``ScheduledFloat`` without a batch count): the
      Balancer is off (p = 0) and the bypass limit's c_min is 0, not the step-0 values (1.0, 0.9).
    - ``"infer"``: the causal threshold rule ``s > θ`` (first-come up to the inference capacity).
    - ``"topk"``: deterministic top-k at the training capacity, ``w = clamp(s, 0, 1)``, no penalty:
      the training-time token budget without randomness, for evaluation.
    """

    def __init__(self, config: SubLLMConfig, *, attention_backend: str = "auto", remat: str = "none",
                 remat_names: tuple[str, ...] = ("qkv", "attn_core"), rngs: nnx.Rngs):
        structure = parse_structure(config.structure, config.keep)
        super().__init__(config.model, attention_backend=attention_backend, remat=remat,
                         remat_names=remat_names, rngs=rngs,
                         layer_groups=[op[1] - op[0] for op in _layer_runs(structure.ops)
                                       if isinstance(op, tuple)])
        mc = config.model
        self.subllm_config = config
        self.structure = structure
        n_sub = self.structure.n_subsamplers
        if config.init == "spec":  # drawn before the scorers: the dense twin draws the same weights
            spec_init(self, rngs.params())
        self.scorers = nnx.List([Scorer(mc.d_model, dtype=jnp.float32, param_dtype=mc.weight_dtype,
                                        rngs=rngs) for _ in range(n_sub)])
        self.bypasses = nnx.List([Bypass(mc.d_model, init=config.bypass_init, param_dtype=mc.weight_dtype)
                                  for _ in range(n_sub)])

    def forward(
        self,
        tokens: Int[Array, "b t"],
        positions: Int[Array, "b t"] | None = None,
        segment_ids: Int[Array, "b t"] | None = None,
        *,
        mode: str = "train",
        step=None,
        rng: Array | None = None,
        force_unit_weights: bool = False,
        capacities: tuple[int, ...] | None = None,
        layer_fn=None,
    ) -> tuple[Float[Array, "b t d"], dict[str, list[Array]]]:
        """Final-normed hidden states and per-subsampler diagnostics.

        The dict holds, indexed by subsampler: ``scores`` (level input, fp32), ``selections``,
        ``weights``, and the ``positions`` / ``segment_ids`` the inner level ran at.
        ``force_unit_weights`` (test hook) sets every valid weight to 1.

        ``capacities`` (infer mode; one static int per subsampler) caps each threshold selection at
        ``min(capacity, level input length)`` instead of ``ceil(infer_capacity·N_in)``: decoding passes
        its cache sizes so a prefill decides exactly as the forward of the whole generated sequence.
        ``layer_fn`` replaces the layer function of :meth:`~tokensparse.llama.Llama.run_layers`
        (prefill uses it to record each layer's keys and values); what it returns per layer is in
        ``aux["layer_outputs"]`` (one entry per layer, None without).

        With ``weight_attn_bias`` each subsampled level's attention adds ``log(w + 1e-3)`` per key
        (summed over the levels the key passed): its layers run with the bias beside the residual
        stream in the loop carry and a key-biased attention core (XLA).
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {MODES}.")
        cfg = self.subllm_config
        train = mode == "train"
        if train and self.structure.n_subsamplers and rng is None:
            raise ValueError("mode='train' needs rng (a PRNG key for the per-call coins) and step.")
        positions = default_positions(tokens) if positions is None else positions
        if segment_ids is None:
            segment_ids = jnp.zeros(tokens.shape, jnp.int32)
        aux: dict[str, list[Any]] = {k: [] for k in
                                     ("scores", "selections", "weights", "positions", "segment_ids")}
        if cfg.weight_attn_bias and layer_fn is not None:
            raise ValueError("SubLLMConfig.weight_attn_bias=True has no decoding path (layer_fn); "
                             "decode a model with weight_attn_bias=False.")
        if capacities is not None and len(capacities) != self.structure.n_subsamplers:
            raise ValueError(f"capacities has {len(capacities)} entries; the structure has "
                             f"{self.structure.n_subsamplers} subsamplers.")
        layer_outputs: list[Any] = [None] * len(self.layers)
        h = shard_residual(self.embed(tokens))
        bias = None  # the key bias of the current level (weight_attn_bias), None at level 0
        stack: list[tuple] = []
        for op in _layer_runs(self.structure.ops):
            if isinstance(op, tuple):  # a run of consecutive layers at one level
                if bias is None:
                    h, outputs = self.run_layers(h, positions, segment_ids, layer_fn=layer_fn,
                                                 start=op[0], stop=op[1])
                else:
                    carry, outputs = self.run_layers((h, bias), positions, segment_ids,
                                                     layer_fn=key_biased_layer, start=op[0],
                                                     stop=op[1])
                    h = residual(carry)
                layer_outputs[op[0]:op[1]] = outputs or [None] * (op[1] - op[0])
            elif op.kind == "down":
                key = None if rng is None else jax.random.fold_in(rng, op.index)
                cap = None if capacities is None else capacities[op.index]
                sel, w, scores = self._select(op, h, segment_ids, mode, step, key, cap)
                if force_unit_weights:
                    w = jnp.where(sel.valid, 1.0, 0.0).astype(w.dtype)
                stack.append((h, sel, w, positions, segment_ids, key, bias))
                h = shard_residual(routing.gather(h, sel))
                if cfg.weight_attn_bias:
                    bias = key_bias(w) + (0.0 if bias is None else routing.gather(bias, sel))
                if cfg.level_positions == "parent" and op.level > 1:
                    positions = routing.gather(parent_ranks(segment_ids), sel)
                else:
                    positions = routing.gather(positions, sel)
                segment_ids = routing.gather(segment_ids, sel, fill_value=-1)
                for name, value in zip(aux, (scores, sel, w, positions, segment_ids), strict=True):
                    aux[name].append(value)
            else:
                x, sel, w, positions, segment_ids, key, bias = stack.pop()
                u = upsample(x, h, sel, w)
                if train:
                    active = coin(jax.random.fold_in(key, 2), BYPASS_LIMIT_PROB)
                    h = self.bypasses[op.index](x, u, limit_active=active, step=step)
                else:
                    h = self.bypasses[op.index](x, u)
        aux["layer_outputs"] = layer_outputs
        return self.final_norm(h), aux

    def _select(self, op, h, segment_ids, mode: str, step, key, capacity: int | None = None):
        cfg = self.subllm_config
        n_in = h.shape[1]
        valid = segment_ids >= 0
        scores = self.scorers[op.index](h)
        shards = route_shards(cfg.route_shards)
        if mode == "topk":
            k = routing.capacity(n_in, op.keep, multiple=cfg.capacity_multiple)
            sel, w = routing.per_shard(train_select, scores, k, shards, valid, discard_penalty=False)
        elif mode == "train":
            scores = balance(scores, keep=op.keep, valid=valid, statistic=cfg.balancer_statistic,
                             margin=cfg.balancer_margin,
                             grad_scale=balancer_grad_scale(0 if step is None else step,
                                                            cfg.balancer_start_scale,
                                                            cfg.balancer_start_steps),
                             active=coin(jax.random.fold_in(key, 0),
                                         0.0 if step is None else balancer_prob(step)))
            k = routing.capacity(n_in, op.keep, multiple=cfg.capacity_multiple)
            flip = coin(jax.random.fold_in(key, 1), 0.5) if cfg.discard_penalty else None
            sel, w = routing.per_shard(train_select, scores, k, shards, valid, flip=flip,
                                       discard_penalty=cfg.discard_penalty)
        else:
            k = routing.capacity(n_in, cfg.infer_capacity) if capacity is None else min(capacity, n_in)
            sel, w = infer_select(scores, k, threshold=cfg.level_threshold(op.level), valid=valid)
        return sel, w, scores

    def hidden_states(self, tokens, positions=None, segment_ids=None, *, mode: str = "train",
                      step=None, rng: Array | None = None, force_unit_weights: bool = False):
        """Final-normed hidden states (before the LM head): the spec's training forward."""
        return self.forward(tokens, positions, segment_ids, mode=mode, step=step, rng=rng,
                            force_unit_weights=force_unit_weights)[0]

    def __call__(self, tokens, positions=None, segment_ids=None, *, mode: str = "train", step=None,
                 rng: Array | None = None, force_unit_weights: bool = False):
        return self.head(self.hidden_states(tokens, positions, segment_ids, mode=mode, step=step,
                                            rng=rng, force_unit_weights=force_unit_weights))


def _layer_runs(ops):
    """The structure's ops with each run of consecutive layer ops replaced by ``(start, stop)``."""
    out: list = []
    for op in ops:
        if op.kind == "layer" and out and isinstance(out[-1], tuple) and out[-1][1] == op.index:
            out[-1] = (out[-1][0], op.index + 1)
        elif op.kind == "layer":
            out.append((op.index, op.index + 1))
        else:
            out.append(op)
    return out


def parent_ranks(segment_ids: Int[Array, "b n"]) -> Int[Array, "b n"]:
    """Each slot's rank among the valid (non-padding) slots of its level: a token's position in the
    repo's "parent" convention, and its slot in that level's decode cache."""
    return jnp.cumsum(segment_ids >= 0, axis=1, dtype=jnp.int32) - 1


def hidden_fn(*, mode: str = "train", step=None, rng: Array | None = None):
    """A ``hidden_fn(model, tokens, positions, segment_ids)`` for :func:`tokensparse.train.lm_loss`."""
    def fn(model: SubLLM, tokens, positions, segment_ids):
        return model.hidden_states(tokens, positions, segment_ids, mode=mode, step=step, rng=rng)
    return fn


def key_biased_layer(block, carry, layer, selection):
    """A decoder layer whose attention adds the per-key bias carried beside the residual stream
    (``carry = (h, bias)``; the bias passes through unchanged)."""
    del selection
    h, bias = carry

    def core(q, k, v, positions, segment_ids, kv_positions=None, kv_segment_ids=None):
        del kv_positions, kv_segment_ids  # no cache: keys are the queries' rows
        return key_biased_attention(q, k, v, bias, q_positions=positions, kv_positions=positions,
                                    q_segment_ids=segment_ids, kv_segment_ids=segment_ids)

    h, normed = block.attend_and_norm(h, layer.positions, layer.segment_ids, core=core)
    return (block.feed_forward(h, normed), bias), None


def spec_init(model: Llama, key: Array) -> None:
    """Redraw the backbone's weights as the official SUBLLM code does, in place.

    Every projection (q, k, v, gate, up and an untied LM head) is truncated normal at ±3σ with
    σ = ``init_std``; the output projections (o, down) use σ/√(2(l+1)) for 0-based layer l (the same
    depth scaling as the Llama init, truncated); the embedding is N(0, 1/d_model), untruncated. The
    scorer and bypass keep their own inits. Scorers and bypasses aside, this replaces what the Llama
    constructor drew, so the SUBLLM and its dense twin (same seed) still start from equal weights.
    """
    mc = model.config
    std = mc.init_std

    def truncated(k, shape, sigma):
        return (sigma * jax.random.truncated_normal(k, -3.0, 3.0, shape, jnp.float32)
                ).astype(mc.weight_dtype)

    keys = iter(jax.random.split(key, 2 + 7 * mc.n_layers))
    model.embed.embedding[...] = (mc.d_model ** -0.5 * jax.random.normal(
        next(keys), model.embed.embedding.shape, jnp.float32)).astype(mc.weight_dtype)
    head_key = next(keys)
    if model.lm_head is not None:
        model.lm_head.kernel[...] = truncated(head_key, model.lm_head.kernel.shape, std)
    with model.layers.editing() as layers:
        for layer, block in enumerate(layers):
            out_std = std / (2 * (layer + 1)) ** 0.5
            for linear, sigma in ((block.attn.q_proj, std), (block.attn.k_proj, std),
                                  (block.attn.v_proj, std), (block.attn.o_proj, out_std),
                                  (block.mlp.gate_proj, std), (block.mlp.up_proj, std),
                                  (block.mlp.down_proj, out_std)):
                linear.kernel[...] = truncated(next(keys), linear.kernel.shape, sigma)
