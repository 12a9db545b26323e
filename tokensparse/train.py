"""Losses, optimizers, train/eval step factories and perplexity evaluation.

The loss is next-token cross-entropy with padding and document boundaries masked, normalised by the
number of valid targets. Its segmented form runs the LM head and the CE in checkpointed chunks under
``lax.map`` so the full [T, V] logits never exist at once: in backward each chunk's logits are
recomputed (LeMo's segmented loss).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from tokensparse import sharding
from tokensparse.config import TrainConfig
from tokensparse.llama import Llama, default_positions


def next_token_targets(tokens: Int[Array, "b t"], segment_ids: Int[Array, "b t"] | None = None):
    """Targets (token t+1 at position t) and 0/1 weights; the last position and cross-document or
    padding pairs get weight 0. Shapes stay [B, T]."""
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    if segment_ids is None:
        segment_ids = jnp.zeros(tokens.shape, jnp.int32)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] >= 0)
    weights = jnp.concatenate([same, jnp.zeros_like(same[:, :1])], axis=1)
    return targets, weights.astype(jnp.float32)


def cross_entropy_sum(logits: Float[Array, "b t v"], targets, weights) -> Float[Array, ""]:
    """Σ weight · CE in fp32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * weights)


def segmented_cross_entropy_sum(hidden: Float[Array, "b t d"], head: Callable[[Array], Array],
                                targets, weights, segment_len: int) -> Float[Array, ""]:
    """Σ weight · CE with the head applied ``segment_len`` positions at a time, each recomputed in
    backward; equals ``cross_entropy_sum(head(hidden), ...)`` in value and gradient."""
    b, t, d = hidden.shape
    n_seg = -(-t // segment_len)
    pad = n_seg * segment_len - t
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        weights = jnp.pad(weights, ((0, 0), (0, pad)))

    def chunks(x):
        return jnp.moveaxis(x.reshape(b, n_seg, segment_len, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def one(args):
        h, tgt, w = args
        return cross_entropy_sum(head(h), tgt, w)

    return jnp.sum(jax.lax.map(one, (chunks(hidden), chunks(targets), chunks(weights))))


def head_function(model: Llama) -> Callable[[Array], Array]:
    """The LM head as a pure function of hidden states (closes over the head weight array)."""
    weight = model.head_weight()
    return lambda h: jnp.dot(h.astype(weight.dtype), weight)


def lm_loss(model: Llama, batch, *, loss_segment: int = 0, selections=None, hidden_fn=None,
            layout: Callable[[int], np.ndarray] | None = None):
    """Mean next-token CE over valid targets, and aux metrics (``tokens``: the number of targets).

    ``hidden_fn(model, tokens, positions, segment_ids)`` replaces the dense forward (e.g. LeMo's).
    ``layout(seq_len)`` (e.g. ``functools.partial(sharding.zigzag_order, shards=4)``) reorders the
    sequence after the targets are formed. Positions travel with the tokens, so attention and the
    loss are unchanged; only which device holds which tokens changes, and what a per-shard selection
    sees.
    """
    targets, weights = next_token_targets(batch.tokens, batch.segment_ids)
    if getattr(batch, "loss_mask", None) is not None:
        weights = weights * batch.loss_mask
    tokens, positions = batch.tokens, batch.positions
    segment_ids = batch.segment_ids
    if positions is None:
        positions = default_positions(tokens)
    if layout is not None:
        order = jnp.asarray(layout(tokens.shape[1]))
        tokens, positions, segment_ids, targets, weights = (
            None if x is None else jnp.take(x, order, axis=1)
            for x in (tokens, positions, segment_ids, targets, weights))
    if hidden_fn is None:
        hidden = model.hidden_states(tokens, positions, segment_ids, selections=selections)
    else:
        hidden = hidden_fn(model, tokens, positions, segment_ids)
    if loss_segment and loss_segment < hidden.shape[1]:
        total = segmented_cross_entropy_sum(hidden, head_function(model), targets, weights,
                                            loss_segment)
    else:
        total = cross_entropy_sum(model.head(hidden), targets, weights)
    count = jnp.sum(weights)
    return total / jnp.maximum(count, 1.0), {"tokens": count}


def learning_rate_schedule(tc: TrainConfig, *, warmup: bool = True) -> optax.Schedule:
    """Linear warm-up from 0 over ``tc.warmup_steps``, then constant or cosine; with ``warmup=False``
    the warm-up steps already run at ``tc.lr`` (the same schedule after them)."""
    if warmup:
        first = optax.linear_schedule(0.0, tc.lr, max(tc.warmup_steps, 1))
    else:
        first = optax.constant_schedule(tc.lr)
    if tc.schedule == "constant":
        after = optax.constant_schedule(tc.lr)
    else:
        after = optax.cosine_decay_schedule(tc.lr, max(tc.steps - tc.warmup_steps, 1),
                                            alpha=tc.min_lr_ratio)
    return optax.join_schedules([first, after], [tc.warmup_steps])


def _decay_mask(params):
    """Weight decay on matrices only (not norms' scales)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def adamw(tc: TrainConfig, schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """The recipe's AdamW alone: ``schedule`` (default :func:`learning_rate_schedule`), betas, decay on
    matrices only."""
    return optax.adamw(schedule or learning_rate_schedule(tc), b1=tc.b1, b2=tc.b2,
                       weight_decay=tc.weight_decay, mask=_decay_mask)


def with_clipping(tc: TrainConfig, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """``tx`` after global-norm clipping at ``tc.grad_clip`` (none when it is 0)."""
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), tx) if tc.grad_clip > 0 else tx


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warm-up then constant or cosine, and global-norm clipping."""
    return with_clipping(tc, adamw(tc))


def split_micro_batches(batch, n: int):
    """``batch`` (a pytree of [B, ...] arrays) as ``n`` stacked micro-batches, [n, B / n, ...].

    Micro-batch ``j`` holds rows ``j, j + n, j + 2n, ...``: with the rows split contiguously over the
    mesh's batch axes, every device then holds an equal share of every micro-batch and the split
    moves no data."""

    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into grad_accum_steps={n} "
                             "micro-batches; make batch_size a multiple of it.")
        stacked = jnp.moveaxis(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 1, 0)
        return sharding.constrain(stacked, (None, *sharding.BATCH_AXES, *[None] * (x.ndim - 2))
                                  [:x.ndim + 1])

    return jax.tree.map(split, batch)


def accumulate_gradients(grad_fn: Callable, model: nnx.Module, micro_batches, step, wrt=nnx.Param):
    """``(loss, aux, grads)`` of ``grad_fn(model, micro_batch, step) -> ((loss, aux), grads)`` over
    stacked ``micro_batches`` ([n, ...] leaves, see :func:`split_micro_batches`), one ``lax.scan``.

    Each micro-batch's gradient and loss are weighted by its ``aux["tokens"]`` (its number of valid
    targets; equal weights when the loss reports none), so for a loss that is a mean over targets
    the result is the gradient and loss of the whole batch, padding and ragged rows included. The
    sum is kept in fp32. ``aux["tokens"]`` is summed, other aux values are weighted means. Model
    state the loss changes (RNG counters) is carried from one micro-batch to the next. Random draws
    keyed by ``step`` alone (SUBLLM's coins) repeat in every micro-batch of a step.
    """
    graphdef, state = nnx.split(model)
    params = nnx.state(model, wrt)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)

    def body(carry, micro_batch):
        state, total, weight = carry
        module = nnx.merge(graphdef, state)
        (loss, aux), grads = grad_fn(module, micro_batch, step)
        w = jnp.asarray(aux["tokens"], jnp.float32) if "tokens" in aux else jnp.float32(1.0)
        total = jax.tree.map(lambda t, g: t + w * g.astype(jnp.float32), total, grads)
        return (nnx.state(module), total, weight + w), (loss, aux, w)

    (state, total, weight), (losses, auxes, ws) = jax.lax.scan(
        body, (state, zeros, jnp.float32(0.0)), micro_batches)
    nnx.update(model, state)
    scale = 1.0 / jnp.maximum(weight, 1e-30)  # all-zero weights: every gradient term is 0 anyway
    grads = jax.tree.map(lambda t, p: (t * scale).astype(p.dtype), total, params)

    def mean(x):
        x = jnp.asarray(x, jnp.float32)
        return jnp.sum(x * ws.reshape(-1, *[1] * (x.ndim - 1)), axis=0) * scale

    aux = {k: (jnp.sum(v, axis=0) if k == "tokens" else mean(v)) for k, v in auxes.items()}
    return mean(losses), aux, grads


def make_train_step(loss_fn: Callable, wrt=nnx.Param, *, pass_step: bool = False,
                    grad_accum_steps: int = 1) -> Callable:
    """``step(model, optimizer, batch) -> metrics``: one jitted update of the ``wrt`` parameters.

    ``loss_fn(model, batch) -> (loss, aux)``; with ``pass_step`` it is called as
    ``loss_fn(model, batch, step)`` with the optimizer's step count (a traced int: schedules and
    per-step random keys inside the loss, e.g. SUBLLM's). Pass ``wrt=tokensparse.lora.LoRAParam`` for
    LoRA-only training: base weights then get no gradient and stay bit-for-bit unchanged.

    ``grad_accum_steps`` > 1 splits each batch into that many micro-batches
    (:func:`split_micro_batches`) and sums their gradients under a ``lax.scan`` inside the same
    compiled step (:func:`accumulate_gradients`) before the one optimizer update: the update of the
    whole batch, with the activation memory of one micro-batch.
    """
    if not (isinstance(grad_accum_steps, int) and grad_accum_steps >= 1):
        raise ValueError(f"grad_accum_steps={grad_accum_steps!r} must be an integer >= 1.")

    def objective(model, batch, step):  # nnx transforms reject keyword-only parameters: wrap them away
        return loss_fn(model, batch, step) if pass_step else loss_fn(model, batch)

    @nnx.jit
    def step(model, optimizer, batch):
        grad_fn = nnx.value_and_grad(objective, argnums=nnx.DiffState(0, wrt), has_aux=True)
        if grad_accum_steps == 1:
            (loss, aux), grads = grad_fn(model, batch, optimizer.step[...])
        else:
            loss, aux, grads = accumulate_gradients(
                grad_fn, model, split_micro_batches(batch, grad_accum_steps), optimizer.step[...],
                wrt)
        optimizer.update(model, grads)
        sharding.constrain_state(model, optimizer)
        return {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

    return step


def make_eval_step(loss_fn: Callable) -> Callable:
    """``eval_step(model, batch) -> (Σ CE, number of targets)`` for exact corpus-level averages."""

    @nnx.jit
    def step(model, batch):
        loss, aux = loss_fn(model, batch)
        return loss * aux["tokens"], aux["tokens"]

    return step


def evaluate(eval_step: Callable, model, batches: Iterable) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over ``batches``."""
    total, count = 0.0, 0.0
    for batch in batches:
        s, n = eval_step(model, batch)
        total, count = total + float(s), count + float(n)
    if count == 0:
        raise ValueError("evaluation saw no target tokens; check the split and seq_len.")
    loss = total / count
    return {"loss": loss, "ppl": float(np.exp(loss)), "tokens": count}
