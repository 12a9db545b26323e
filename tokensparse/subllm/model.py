"""The SUBLLM model (NNX): a Llama backbone whose middle layers run on learned token subsets.

Spec: ``reference/subllm.md`` §2.8. The forward walks the parsed structure with a stack: at ``(`` the
scorer picks a static-capacity subset (train: top-k + discard penalty; infer: first-come threshold),
the hidden states, positions and segment ids are gathered; at ``)`` the short stream is upsampled into
the stream saved at ``(`` and mixed with it by the bypass. Positions travel with the tokens, so RoPE
always sees original positions (composed across levels) and padding slots (segment −1) see nothing.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from tokensparse import routing
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
      needs ``rng`` (their per-call coins) and ``step`` (their schedules).
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
        step=0,
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
        if capacities is not None and len(capacities) != self.structure.n_subsamplers:
            raise ValueError(f"capacities has {len(capacities)} entries; the structure has "
                             f"{self.structure.n_subsamplers} subsamplers.")
        layer_outputs: list[Any] = [None] * len(self.layers)
        h = shard_residual(self.embed(tokens))
        stack: list[tuple] = []
        for op in _layer_runs(self.structure.ops):
            if isinstance(op, tuple):  # a run of consecutive layers at one level
                h, outputs = self.run_layers(h, positions, segment_ids, layer_fn=layer_fn,
                                             start=op[0], stop=op[1])
                layer_outputs[op[0]:op[1]] = outputs or [None] * (op[1] - op[0])
            elif op.kind == "down":
                key = None if rng is None else jax.random.fold_in(rng, op.index)
                cap = None if capacities is None else capacities[op.index]
                sel, w, scores = self._select(op, h, segment_ids, mode, step, key, cap)
                if force_unit_weights:
                    w = jnp.where(sel.valid, 1.0, 0.0).astype(w.dtype)
                stack.append((h, sel, w, positions, segment_ids, key))
                h = shard_residual(routing.gather(h, sel))
                if cfg.level_positions == "parent" and op.level > 1:
                    positions = routing.gather(parent_ranks(segment_ids), sel)
                else:
                    positions = routing.gather(positions, sel)
                segment_ids = routing.gather(segment_ids, sel, fill_value=-1)
                for name, value in zip(aux, (scores, sel, w, positions, segment_ids), strict=True):
                    aux[name].append(value)
            else:
                x, sel, w, positions, segment_ids, key = stack.pop()
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
                             grad_scale=balancer_grad_scale(step, cfg.balancer_start_scale,
                                                            cfg.balancer_start_steps),
                             active=coin(jax.random.fold_in(key, 0), balancer_prob(step)))
            k = routing.capacity(n_in, op.keep, multiple=cfg.capacity_multiple)
            flip = coin(jax.random.fold_in(key, 1), 0.5) if cfg.discard_penalty else None
            sel, w = routing.per_shard(train_select, scores, k, shards, valid, flip=flip,
                                       discard_penalty=cfg.discard_penalty)
        else:
            k = routing.capacity(n_in, cfg.infer_capacity) if capacity is None else min(capacity, n_in)
            sel, w = infer_select(scores, k, threshold=cfg.infer_threshold, valid=valid)
        return sel, w, scores

    def hidden_states(self, tokens, positions=None, segment_ids=None, *, mode: str = "train",
                      step=0, rng: Array | None = None, force_unit_weights: bool = False):
        """Final-normed hidden states (before the LM head), spec §2.8."""
        return self.forward(tokens, positions, segment_ids, mode=mode, step=step, rng=rng,
                            force_unit_weights=force_unit_weights)[0]

    def __call__(self, tokens, positions=None, segment_ids=None, *, mode: str = "train", step=0,
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


def hidden_fn(*, mode: str = "train", step=0, rng: Array | None = None):
    """A ``hidden_fn(model, tokens, positions, segment_ids)`` for :func:`tokensparse.train.lm_loss`."""
    def fn(model: SubLLM, tokens, positions, segment_ids):
        return model.hidden_states(tokens, positions, segment_ids, mode=mode, step=step, rng=rng)
    return fn
