"""LeMo's per-layer threshold tuning (paper Algorithm 1; schedule option ``"algorithm1"``, library constants).

Each layer l keeps the blocks whose oracle score, normalised by the row's largest block score, is at
least τ_l ∈ [0, 1]. Starting from τ_l = the layer's mean normalised block score on calibration data,
five rounds of central finite differences estimate G_l = (acc(τ_l + ε) − acc(τ_l − ε)) / 2ε with
acc = −(mean next-token cross entropy of the LeMo forward) on the calibration sequences, and step
τ ← clip(τ + η·G, 0, 1) (ε = 0.02, η = 0.5: the spec's choices; the paper gives none). The tuned
thresholds become a keep-ratio profile, the mean kept fraction per layer on the calibration data,
which training then uses through ``LeMoConfig(schedule="profile", profile=...)``: the threshold mode
itself keeps every block slot (capacity n_b, a validity mask) and so saves no memory.

Note the objective has no sparsity term: with larger steps or more rounds the thresholds drift
towards keeping more. That is the algorithm as specified; the initialisation carries the sparsity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from tokensparse import routing, train
from tokensparse.config import LeMoConfig
from tokensparse.lemo import scoring
from tokensparse.lemo.forward import check_lemo, lemo_block_fn
from tokensparse.lemo.selection import oracle_block_scores
from tokensparse.llama import Llama


def normalised_scores(column_scores: Float[Array, "b nb"]) -> Float[Array, "b nb"]:
    """Block scores divided by each row's largest (scores are ≥ 0: sums of ReLU logits)."""
    top = jnp.max(column_scores, axis=-1, keepdims=True)
    return column_scores / jnp.where(top > 0, top, 1.0)


def threshold_selection(column_scores, tau, block_size: int) -> routing.Selection:
    """Every block with normalised score ≥ ``tau``: all n_b block slots, the rest marked invalid."""
    b, nb = column_scores.shape
    keep = jax.lax.stop_gradient(normalised_scores(column_scores)) >= tau
    blocks = routing.Selection(jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, nb)), keep)
    return routing.expand_blocks(blocks, block_size)


def _forward(model: Llama, batch, taus, lemo: LeMoConfig):
    """(cross entropy, per-layer kept fraction, per-layer mean normalised score) at thresholds."""
    tokens = batch.tokens
    opts = scoring.ScoreOptions.from_lemo(lemo)
    run_block = lemo_block_fn(model, lemo)

    def layer_fn(block, h, layer, _):
        scores = oracle_block_scores(block, block.input_norm(h), opts, layer.positions)
        selection = threshold_selection(scores, layer.inputs, lemo.block_size)
        h = run_block(block, h, layer.positions, layer.segment_ids, selection)
        return h, (jnp.mean(selection.valid), jnp.mean(normalised_scores(scores)))

    hidden, _, outputs = model.hidden_states(tokens, batch.positions, batch.segment_ids,
                                             layer_fn=layer_fn, inputs=list(taus))
    kept, means = zip(*outputs, strict=True)
    targets, weights = train.next_token_targets(tokens, batch.segment_ids)
    total = train.cross_entropy_sum(model.head(hidden), targets, weights)
    return total / jnp.maximum(weights.sum(), 1.0), jnp.stack(kept), jnp.stack(means)


@dataclasses.dataclass(frozen=True)
class ThresholdResult:
    thresholds: tuple[float, ...]  # tuned τ_l, normalised by the layer's largest block score
    profile: tuple[float, ...]  # mean kept fraction per layer at the tuned thresholds
    history: list[dict]  # per round: thresholds, loss, gradient


def tune_thresholds(model: Llama, batches, lemo: LeMoConfig, *, rounds: int = 5,
                    eps: float = 0.02, lr: float = 0.5) -> ThresholdResult:
    """Algorithm 1 on calibration ``batches`` (data.Batch-like: tokens, positions, segment_ids).

    Costs (2·L + 1) LeMo forwards per batch per round, no backward.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("tune_thresholds needs at least one calibration batch.")
    for b in batches:  # (the per-layer schedule is what this tunes: validate the rest)
        check_lemo(model, lemo.replace(schedule="all", profile=None), b.tokens.shape[1])
    n_layers = len(model.layers)
    evaluate = nnx.jit(lambda m, batch, taus: _forward(m, batch, taus, lemo))

    def measure(taus):
        outs = [evaluate(model, b, jnp.asarray(taus, jnp.float32)) for b in batches]
        return tuple(np.mean([np.asarray(o[i]) for o in outs], axis=0) for i in range(3))

    _, _, means = measure(np.zeros(n_layers))  # τ = 0 keeps every block: the dense forward
    taus = np.clip(means, 0.0, 1.0)
    history = []
    for _ in range(rounds):
        loss, _, _ = measure(taus)
        grad = np.zeros(n_layers)
        for layer in range(n_layers):
            step = np.zeros(n_layers)
            step[layer] = eps
            acc_up = -measure(np.clip(taus + step, 0.0, 1.0))[0]
            acc_down = -measure(np.clip(taus - step, 0.0, 1.0))[0]
            grad[layer] = (acc_up - acc_down) / (2 * eps)
        history.append({"thresholds": taus.tolist(), "loss": float(loss), "gradient": grad.tolist()})
        taus = np.clip(taus + lr * grad, 0.0, 1.0)
    loss, kept, _ = measure(taus)
    history.append({"thresholds": taus.tolist(), "loss": float(loss)})
    profile = tuple(float(np.clip(k, 1e-3, 1.0)) for k in kept)
    return ThresholdResult(tuple(float(t) for t in taus), profile, history)
