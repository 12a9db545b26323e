"""A keep-ratio profile from measured per-layer costs under a loss budget (LeMo option
``schedule="sensitivity"``; a library choice).

Algorithm 1 (:mod:`tokensparse.lemo.profiles.algorithm1`) climbs a finite-difference gradient of the
calibration loss from thresholds that start out eliminating about half of every layer; on a model
whose block scores are flat (SmolLM2-135M, docs/lemo.md) that start costs several nats and the climb
ends where the differences vanish, not where the loss is low. This asks the model directly instead:

1. ``cost[l]`` = calibration loss with layer l alone keeping ``keep_ratio`` of its blocks (the
   training forward's own top-k selection, every other layer dense) minus the dense loss. The dense
   hidden states are computed once, so probing layer l re-runs only layers l..L-1.
2. Layers are made sparse cheapest first (a negative cost, elimination that helps, comes first)
   while the summed cost stays within ``budget`` nats; the rest stay dense.
3. The profile's own loss is measured once more with the whole profile (costs need not add up).

Cost: about L/2 + 1 dense forwards per calibration window, no backward.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensparse import train
from tokensparse.config import LeMoConfig
from tokensparse.lemo import rules
from tokensparse.lemo.forward import check_lemo, lemo_block, lemo_loss
from tokensparse.lemo.selection import rule_selection
from tokensparse.llama import Llama, default_positions


def _mean_loss(model: Llama, hidden, tokens, segment_ids):
    """Mean next-token cross entropy of final-normed ``hidden``."""
    targets, weights = train.next_token_targets(tokens, segment_ids)
    total = train.cross_entropy_sum(model.head(hidden), targets, weights)
    return total / jnp.maximum(weights.sum(), 1.0)


def _dense_inputs(model: Llama, tokens, positions, segment_ids):
    """Every layer's input in the dense forward, and the dense mean loss."""
    def layer_fn(block, h, layer, _):
        return lemo_block(block, h, layer.positions, layer.segment_ids, None), h

    hidden, _, inputs = model.hidden_states(tokens, positions, segment_ids, layer_fn=layer_fn)
    return jnp.stack(inputs), _mean_loss(model, hidden, tokens, segment_ids)


def _probe_loss(model: Llama, h, tokens, positions, segment_ids, target, *, keep_ratio: float,
                lemo: LeMoConfig):
    """Loss with only layer ``target`` (traced) sparse, run from ``h``, its dense input: the layers
    before it are skipped, those after it run dense (one compiled program for every target)."""
    score = rules.get(lemo.selector).scorer(model, lemo)

    def layer_fn(block, h, layer, _):
        def sparse(h):
            selection = rule_selection(score, block, h, layer, keep_ratio, lemo)
            return lemo_block(block, h, layer.positions, layer.segment_ids, selection)

        def dense(h):
            return lemo_block(block, h, layer.positions, layer.segment_ids, None)

        branch = jnp.clip(layer.index - target + 1, 0, 2)  # before, at, after the target
        return jax.lax.switch(branch, (lambda h: h, sparse, dense), h), None

    h, _ = model.run_layers(h, positions, segment_ids, layer_fn=layer_fn)
    return _mean_loss(model, model.final_norm(h), tokens, segment_ids)


def _one_sparse(n_layers: int, layer: int, keep_ratio: float) -> tuple[float, ...]:
    return tuple(keep_ratio if i == layer else 1.0 for i in range(n_layers))


def probed_layers(model: Llama, lemo: LeMoConfig, keep_ratio: float) -> list[int]:
    """The layers ``lemo.selector`` can select in (a learned selector has weights for some layers
    only); raises the rule's own error when it can select in none."""
    rule, n_layers = rules.get(lemo.selector), len(model.layers)
    if rule.check is None:
        return list(range(n_layers))
    layers = []
    for layer in range(n_layers):
        ratios = _one_sparse(n_layers, layer, keep_ratio)
        try:
            rule.check(model, lemo.replace(schedule="profile", profile=ratios), ratios)
        except ValueError:
            continue
        layers.append(layer)
    if not layers:  # e.g. no weights at all: the rule says what to do
        rule.check(model, lemo.replace(schedule="all", keep_ratio=keep_ratio, profile=None),
                   (keep_ratio,) * n_layers)
    return layers


def layer_costs(model: Llama, batches, lemo: LeMoConfig, keep_ratio: float,
                layers: Sequence[int] | None = None) -> np.ndarray:
    """[n_batches, L]: each batch's loss with only layer l keeping ``keep_ratio`` of its blocks
    (selected as training selects them: ``lemo.selector``'s rule, ``keep_first_block``), minus
    its dense loss; ``inf`` for a layer the rule cannot select in (:func:`probed_layers`: never
    made sparse) and, when ``layers`` is given, for every layer outside it (the candidates: e.g.
    the same layers for every rule compared). Rules with one module per layer (``predictor``)
    cannot be probed here."""
    batches = list(batches)
    if not batches:
        raise ValueError("layer_costs needs at least one calibration batch.")
    if rules.get(lemo.selector).per_layer:
        raise ValueError(f"the sensitivity profile cannot probe selector={lemo.selector!r} (one "
                         "module per layer); measure it with selector='oracle' or another rule.")
    if not 0.0 < keep_ratio < 1.0:
        raise ValueError(f"keep_ratio={keep_ratio} must be in (0, 1): 1 eliminates nothing.")
    probed = probed_layers(model, lemo, keep_ratio)
    if layers is not None:
        outside = sorted(set(layers) - set(probed))
        if outside:
            raise ValueError(f"selector={lemo.selector!r} cannot select in layers {outside}; it can "
                             f"in {probed}.")
        probed = sorted(set(layers))
        if not probed:
            raise ValueError("layer_costs needs at least one candidate layer.")
    first = _one_sparse(len(model.layers), probed[0], keep_ratio)
    for b in batches:
        check_lemo(model, lemo.replace(schedule="profile", profile=first), b.tokens.shape[1],
                   training=False)  # forwards only: no adapters needed

    dense = nnx.jit(_dense_inputs)
    probe = nnx.jit(functools.partial(_probe_loss, keep_ratio=keep_ratio, lemo=lemo))
    n_layers = len(model.layers)
    costs = np.full((len(batches), n_layers), np.inf)
    for i, b in enumerate(batches):
        tokens = jnp.asarray(b.tokens)
        positions = default_positions(tokens) if b.positions is None else jnp.asarray(b.positions)
        segment_ids = None if b.segment_ids is None else jnp.asarray(b.segment_ids)
        inputs, dense_loss = dense(model, tokens, positions, segment_ids)
        losses = [probe(model, inputs[layer], tokens, positions, segment_ids, jnp.int32(layer))
                  for layer in probed]  # dispatched back to back, fetched once
        costs[i, probed] = np.asarray(jax.device_get(losses)) - float(dense_loss)
    return costs


def budget_profile(costs, keep_ratio: float, budget: float) -> tuple[float, ...]:
    """Per-layer keep ratios: ``keep_ratio`` in the cheapest layers (by ``costs``, one per layer),
    taken in ascending order while their summed cost stays ≤ ``budget``; 1.0 (dense) elsewhere."""
    costs = np.asarray(costs, dtype=np.float64)
    if costs.ndim != 1:
        raise ValueError(f"costs must be one value per layer; got shape {costs.shape}.")
    if budget < 0:
        raise ValueError(f"budget={budget} must be >= 0 (nats of calibration loss).")
    profile, spent = np.ones(costs.shape[0]), 0.0
    for layer in np.argsort(costs, kind="stable"):
        if spent + costs[layer] > budget:
            break
        spent += costs[layer]
        profile[layer] = keep_ratio
    return tuple(float(r) for r in profile)


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    profile: tuple[float, ...]  # per-layer keep ratio (1.0 = dense)
    costs: tuple[float | None, ...]  # per-layer mean cost (nats) of keeping keep_ratio there alone
    # (None: a layer the rule cannot select in)
    keep_ratio: float
    budget: float
    dense_loss: float  # mean calibration loss, dense forward
    profile_loss: float  # the same with the whole profile (measured, not the sum of costs)


def tune_profile(model: Llama, batches, lemo: LeMoConfig, *, keep_ratio: float,
                 budget: float) -> SensitivityResult:
    """:func:`layer_costs` averaged over ``batches``, :func:`budget_profile`, and both losses."""
    batches = list(batches)
    costs = layer_costs(model, batches, lemo, keep_ratio).mean(axis=0)
    profile = budget_profile(costs, keep_ratio, budget)
    sparse_lemo = lemo.replace(schedule="profile", profile=profile)

    def mean_loss(loss_fn):
        step = nnx.jit(lambda m, b: loss_fn(m, b)[0])
        return float(np.mean([float(step(model, b)) for b in batches]))

    return SensitivityResult(profile, tuple(float(c) if np.isfinite(c) else None for c in costs),
                             keep_ratio, budget,
                             mean_loss(train.lm_loss),
                             mean_loss(lambda m, b: lemo_loss(m, b, lemo=sparse_lemo)))
