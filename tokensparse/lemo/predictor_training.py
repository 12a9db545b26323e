"""Training LeMo's pattern predictors on the oracle scores of a frozen model.
(The spec: the published method, see docs/lemo.md#sources.)

1. **Targets.** For each training window the frozen model runs dense; at every predictor layer the
   layer's normed input X and the oracle tile matrix of its pre-RoPE q, k (the artifact's target
   kernel, :func:`tokensparse.lemo.scoring.block_tiles`, linear memory) are kept. Windows are a pure
   function of their index and are collected once, then cycled (``train_windows`` of them). They
   are stored on disk (:mod:`tokensparse.lemo.targets`) under ``tc.targets_dir`` or
   ``workdir/targets``: host memory holds one window, a resumed run collects nothing again, and
   runs with other training settings over the same model and windows can share one directory.
2. **Fit.** All layers' predictors at once: SmoothL1 (β = 1, mean over the n_b² tiles) between the
   predicted tile matrix P and ``target_scale ·`` the oracle's, summed over layers; AdamW with
   linear warm-up then a constant rate. ``loss="column"`` fits standardised column scores instead:
   when a model's block scores differ by a few percent (small, briefly trained models), the tile
   loss is minimised by predicting the mean and ranks no better than chance.
3. **Elastic pruning.** Per output neuron of the first two linears of every path, count the
   (head, block) rows whose pre-activation is ≤ 0 since the last prune. At steps ``prune_every``,
   2·``prune_every``, … below ``prune_until``, the k-th prune drops neurons whose zero fraction
   exceeds τ_k = ``prune_start_tau`` − ``prune_tau_step``·(k−1), with the matching input rows of the
   next linear, and slices the Adam moments alike (shapes change: the step recompiles).
4. **Held-out metrics** (:func:`evaluate`): per layer, recall of the oracle's kept set at a keep
   ratio, ``|TopK(ĉ) ∩ TopK(c)| / K`` with K = floor(ratio · n_b) (the paper's recall), and the Spearman
   correlation of ĉ with c; each averaged over windows.

Checkpoints (``workdir/checkpoints``) hold weights, Adam state and zero counters, with the widths
in their metadata; an interrupted run resumes exactly. The result is saved as its own checkpoint
item, ``workdir/predictors`` (:func:`tokensparse.lemo.predictor.load_predictors`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tokensparse.checkpoint import Checkpointer, CheckpointError, InterruptGuard
from tokensparse.config import LeMoConfig
from tokensparse.lemo.predictor import (
    PATHS,
    LeMoPredictors,
    block_rows,
    path_forward,
    predicted_tiles,
    save_predictors,
)
from tokensparse.lemo.targets import TargetCache
from tokensparse.llama import Llama
from tokensparse.metrics import JsonlLogger, Progress

LOSSES = ("smooth_l1", "mse", "column")


@dataclasses.dataclass(frozen=True)
class PredictorTrainConfig:
    """How predictors are trained (the spec's lr 2e-5 is for 7B-scale 16K windows)."""

    seq_len: int = 2048
    """Window length the predictors are trained and scored at: the fine-tuning context (RoPE-scaled
    as fine-tuning scales it)."""
    steps: int = 400
    """Optimizer steps."""
    train_windows: int = 128
    """Distinct training windows, collected once and cycled."""
    eval_windows: int = 16
    """Held-out windows for recall and Spearman."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, constant after the warm-up; the spec's 2e-5 is for 7B-scale 16K
    windows)."""
    b1: float = 0.9
    """AdamW's first-moment decay."""
    b2: float = 0.95
    """AdamW's second-moment decay."""
    weight_decay: float = 0.0
    """AdamW's decoupled weight decay."""
    warmup_steps: int = 20
    """Steps of linear warm-up from 0 to lr."""
    loss: str = "smooth_l1"
    """smooth_l1 (the spec's, on the tile matrix), mse, or column (standardised column scores: only
    the ranking counts)."""
    target_scale: float = 1.0
    """Multiplies the oracle tiles (already divided by 1024)."""
    h1: int = 128
    """Width of every path's first hidden layer before pruning."""
    h2: int = 0
    """Width of the second hidden layer before pruning; 0: block_size · d_model / n_heads (the
    spec's b·d)."""
    layers: tuple[int, ...] = ()
    """Layers that get predictors; (): every layer but the last."""
    sparse_only: bool = False
    """Only the layers the default LeMo schedule makes sparse (those fine-tuning uses)."""
    block_size: int = 64
    """Tokens per block; seq_len must be a multiple (fine-tuning's lemo.block_size)."""
    prune_every: int = 100
    """Steps between prunes; 0: no pruning."""
    prune_until: int = 620
    """Prunes happen only at steps below this."""
    prune_start_tau: float = 0.8
    """The first prune drops neurons whose pre-activation was <= 0 on more than this fraction of
    rows, in (0, 1]."""
    prune_tau_step: float = 0.05
    """Each later prune lowers that fraction by this."""
    keep_ratio: float = 0.4
    """Recall is measured at this keep ratio."""
    seed: int = 0
    """Seed of the initialisation and of the training windows' order."""
    log_every: int = 10
    """Log (metrics.jsonl, progress) every this many steps."""
    checkpoint_every: int = 100
    """Save a checkpoint every this many steps (and at the end)."""
    targets_dir: str = ""
    """Where collected targets are stored; empty: <workdir>/targets."""

    def __post_init__(self):
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"PredictorTrainConfig: {message}")

        check(self.seq_len > 0 and self.seq_len % self.block_size == 0,
              f"seq_len={self.seq_len} must be a positive multiple of block_size={self.block_size}.")
        check(self.steps >= 0 and self.train_windows >= 1 and self.eval_windows >= 0,
              "steps and eval_windows must be >= 0, train_windows >= 1.")
        check(self.lr > 0 and self.warmup_steps >= 0, "lr must be > 0 and warmup_steps >= 0.")
        check(self.loss in LOSSES, f"loss={self.loss!r} must be one of {LOSSES}.")
        check(self.target_scale > 0, "target_scale must be positive.")
        check(self.h1 >= 1 and self.h2 >= 0, "h1 must be >= 1 and h2 >= 0.")
        check(self.prune_every >= 0 and 0.0 < self.prune_start_tau <= 1.0 and self.prune_tau_step >= 0,
              "prune_every must be >= 0, prune_start_tau in (0, 1], prune_tau_step >= 0.")
        check(0.0 < self.keep_ratio <= 1.0, f"keep_ratio={self.keep_ratio} must be in (0, 1].")
        check(self.log_every >= 1 and self.checkpoint_every >= 1,
              "log_every and checkpoint_every must be >= 1.")
        check(not (self.layers and self.sparse_only), "give layers or sparse_only, not both.")

    def layer_ids(self, n_layers: int) -> tuple[int, ...] | None:
        """The layers that get predictors: ``layers``; with ``sparse_only`` those the default
        :class:`LeMoConfig` schedule makes sparse (dense layers skip their predictors in
        fine-tuning); None for the predictors' default, every layer but the last."""
        if self.sparse_only:
            return self.default_sparse_layers(n_layers)
        return self.layers or None

    def default_sparse_layers(self, n_layers: int) -> tuple[int, ...]:
        """The layers the default :class:`LeMoConfig` schedule (at ``block_size``) makes sparse."""
        ratios = LeMoConfig(block_size=self.block_size).keep_ratios(n_layers)
        return tuple(i for i, r in enumerate(ratios) if r < 1.0)

    def prune_tau(self, step: int) -> float | None:
        """τ of the prune after ``step`` completed steps, or None when no prune happens there."""
        if not self.prune_every or step % self.prune_every or step >= self.prune_until or step == 0:
            return None
        k = step // self.prune_every
        return self.prune_start_tau - self.prune_tau_step * (k - 1)


# ----------------------------------------------------------------------------- loss and step


def predictor_loss(params, targets, *, n_heads: int, block_size: int, dtype, loss: str = "smooth_l1",
                   target_scale: float = 1.0):
    """Σ over layers of mean SmoothL1 (``loss="smooth_l1"``, the spec's) or MSE between P and
    ``target_scale ·`` oracle tiles; ``loss="column"``: SmoothL1 between the column scores ĉ and c,
    each standardised over the blocks of its row (only the ranking, which selection uses, counts).

    Returns ``(loss, aux)``; ``aux["layer_loss"][layer]``, and ``aux["zeros"][layer][path]["a1"]``
    (["a2"]): per neuron of the first (second) linear, the rows whose pre-activation is <= 0."""
    total, layer_loss, zeros = 0.0, {}, {}
    for layer, layer_params in params.items():
        x, tiles = targets[layer]
        rows = block_rows(x, n_heads, block_size)
        outs = {side: path_forward(layer_params[side], rows, dtype) for side in PATHS}
        p = predicted_tiles(outs["q"][0], outs["k"][0])
        target = tiles.astype(jnp.float32) * target_scale
        if loss == "column":  # ranking-aware: standardised column scores, per row
            p, target = _standardise(p.sum(axis=1)), _standardise(target.sum(axis=1))
        err = (p - target) ** 2 if loss == "mse" else optax.huber_loss(p, target, delta=1.0)
        layer_loss[layer] = jnp.mean(err)
        total = total + layer_loss[layer]
        zeros[layer] = {side: {name: jnp.sum(a <= 0, axis=(0, 1, 2), dtype=jnp.int32)
                               for name, a in zip(("a1", "a2"), outs[side][1], strict=True)}
                        for side in PATHS}
    return total, {"layer_loss": layer_loss, "zeros": zeros}


def _standardise(c: jax.Array) -> jax.Array:
    """Zero mean, unit variance over the last axis (blocks): keeps only the ranking signal."""
    c = c - jnp.mean(c, axis=-1, keepdims=True)
    return c / (jnp.std(c, axis=-1, keepdims=True) + 1e-6)


def make_optimizer(tc: PredictorTrainConfig) -> optax.GradientTransformation:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, tc.lr, max(tc.warmup_steps, 1)), optax.constant_schedule(tc.lr)],
        [max(tc.warmup_steps, 1)])
    return optax.adamw(schedule, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay)


def make_step(tx: optax.GradientTransformation, **loss_kw) -> Callable:
    """``step(params, opt_state, zeros, targets) -> (params, opt_state, zeros, loss, layer_loss)``,
    jitted; ``zeros`` (the pruning counters) accumulate on the device."""

    @jax.jit
    def step(params, opt_state, zeros, targets):
        (loss, aux), grads = jax.value_and_grad(predictor_loss, has_aux=True)(params, targets,
                                                                                **loss_kw)
        updates, opt_state = tx.update(grads, opt_state, params)
        zeros = jax.tree.map(jnp.add, zeros, aux["zeros"])
        return optax.apply_updates(params, updates), opt_state, zeros, loss, aux["layer_loss"]

    return step


# ----------------------------------------------------------------------------- pruning


def zero_counters(params) -> dict:
    """All-zero counters shaped like the widths: ``{layer: {path: {"a1": [h1], "a2": [h2]}}}``."""
    return {layer: {side: {"a1": np.zeros(p[side]["w1"].shape[1], np.int32),
                           "a2": np.zeros(p[side]["w2"].shape[1], np.int32)} for side in PATHS}
            for layer, p in params.items()}


def neurons_to_keep(zeros: Mapping, rows: int, tau: float) -> dict:
    """Indices of the neurons whose zero fraction is ≤ τ (at least one per linear: the least-zero
    neuron survives even when all exceed τ)."""
    keep = {}
    for layer, sides in zeros.items():
        keep[layer] = {}
        for side, counts in sides.items():
            kept = []
            for name in ("a1", "a2"):
                frac = np.asarray(counts[name]) / max(rows, 1)
                idx = np.flatnonzero(frac <= tau)
                kept.append(idx if idx.size else np.array([int(np.argmin(frac))]))
            keep[layer][side] = tuple(kept)
    return keep


def _slice_weight(x, name: str, keep1, keep2):
    if name == "w1":
        return x[:, keep1]
    if name == "w2":
        return x[keep1][:, keep2]
    return x[keep2]


def prune_tree(tree, keep: Mapping):
    """Slice every ``[layer][path][w1|w2|w3]`` array in ``tree`` (parameters or the Adam moments,
    which share their structure) down to the kept neurons; other leaves are unchanged."""

    def visit(path, x):
        keys = [getattr(p, "key", None) for p in path]
        for j in range(len(keys) - 2):
            layer, side, name = keys[j:j + 3]
            if layer in keep and side in PATHS and name in ("w1", "w2", "w3") and j + 3 == len(keys):
                return _slice_weight(x, name, *keep[layer][side])
        return x

    return jax.tree_util.tree_map_with_path(visit, tree)


def widths_of(params) -> dict[int, dict[str, tuple[int, int]]]:
    return {int(layer): {side: (int(p[side]["w1"].shape[1]), int(p[side]["w2"].shape[1]))
                         for side in PATHS} for layer, p in params.items()}


def count_params(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class PredictorRun:
    predictors: LeMoPredictors
    params_before: int  # before any pruning
    step: int
    interrupted: bool
    history: list[dict[str, Any]]
    collect_s: float
    train_s: float


_RUN_LENGTH_FIELDS = ("steps", "log_every", "checkpoint_every", "eval_windows", "targets_dir")


def _resume_relevant(train: Mapping) -> dict:
    """Training settings a resumed run must share (it may run longer, log or save differently)."""
    return {k: v for k, v in train.items() if k not in _RUN_LENGTH_FIELDS}


def targets_directory(tc: PredictorTrainConfig, workdir: str | pathlib.Path) -> pathlib.Path:
    """Where a run's targets live: ``tc.targets_dir`` or ``workdir/targets`` (``train/`` and
    ``held_out/`` below it)."""
    return pathlib.Path(tc.targets_dir) if tc.targets_dir else pathlib.Path(workdir) / "targets"


def _metadata(params, step: int, rows: int, extra: Mapping) -> dict:
    widths = {str(k): {s: list(w) for s, w in v.items()} for k, v in widths_of(params).items()}
    return {**extra, "step": step, "rows_since_prune": rows, "widths": widths}


def train_predictors(model: Llama, train_windows, tc: PredictorTrainConfig,
                     workdir: str | pathlib.Path, *, metadata: Mapping | None = None,
                     progress: bool = True) -> PredictorRun:
    """Train predictors for ``model`` (frozen) on ``train_windows.batch(i)``, i < ``tc.train_windows``,
    resuming from ``workdir/checkpoints``; saves the result to ``workdir/predictors``."""
    workdir = pathlib.Path(workdir)
    config = model.config
    layer_ids = tc.layer_ids(config.n_layers)
    predictors = LeMoPredictors(config, block_size=tc.block_size, layer_ids=layer_ids, h1=tc.h1,
                                h2=tc.h2 or None, dtype=config.compute_dtype,
                                rngs=nnx.Rngs(tc.seed))
    params_before = predictors.num_params()
    metadata = json.loads(json.dumps({"model": config.to_dict(), **dict(metadata or {}),
                                      "train": dataclasses.asdict(tc)}))  # as stored
    cache = TargetCache(model, train_windows, predictors.layer_ids, tc.block_size,
                        directory=targets_directory(tc, workdir) / "train")
    tx = make_optimizer(tc)
    step_fn = make_step(tx, n_heads=config.n_heads, block_size=tc.block_size,
                        dtype=config.compute_dtype, loss=tc.loss, target_scale=tc.target_scale)
    checkpointer = Checkpointer(workdir / "checkpoints", save_every=tc.checkpoint_every, keep=2)
    logger = JsonlLogger(workdir / "metrics.jsonl")

    params = predictors.params()
    opt_state = tx.init(params)
    zeros, rows, start = zero_counters(params), 0, 0
    if checkpointer.latest_step() is not None:
        saved = checkpointer.restore_metadata()
        if saved.get("model") != metadata["model"] or (
                _resume_relevant(saved.get("train", {})) != _resume_relevant(metadata["train"])):
            raise CheckpointError(f"predictor checkpoint in {workdir / 'checkpoints'} was written for "
                                  "another model or training config; use a fresh workdir.")
        widths = {int(k): {s: tuple(w) for s, w in v.items()} for k, v in saved["widths"].items()}
        predictors = LeMoPredictors(config, block_size=tc.block_size, layer_ids=layer_ids,
                                    widths=widths, dtype=config.compute_dtype, rngs=nnx.Rngs(0))
        params = predictors.params()
        target = {"params": params, "opt": tx.init(params), "zeros": zero_counters(params)}
        restored, saved = checkpointer.restore(target)
        params, opt_state, zeros = restored["params"], restored["opt"], restored["zeros"]
        rows, start = int(saved["rows_since_prune"]), int(saved["step"])

    def save(step: int) -> None:
        checkpointer.save(step, {"params": params, "opt": opt_state, "zeros": zeros},
                          _metadata(params, step, rows, metadata), force=True)

    history: list[dict[str, Any]] = []
    bar = Progress(tc.steps, start=start, every=tc.log_every) if progress else None
    interrupted, done, t0 = False, start, time.perf_counter()
    with InterruptGuard() as guard:
        for step in range(start, tc.steps):
            targets = cache(step % tc.train_windows)
            params, opt_state, zeros, loss, layer_loss = step_fn(params, opt_state, zeros, targets)
            loss = float(loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"predictor loss is {loss} at step {step}; lower the lr.")
            x = next(iter(targets.values()))[0]
            rows += x.shape[0] * config.n_heads * (x.shape[1] // tc.block_size)
            done = step + 1
            tau = tc.prune_tau(done)
            record = None
            if tau is not None:
                keep = neurons_to_keep(jax.tree.map(np.asarray, zeros), rows, tau)
                params, opt_state = prune_tree(params, keep), prune_tree(opt_state, keep)
                zeros, rows = zero_counters(params), 0
                record = {"step": done, "prune_tau": tau, "params": count_params(params)}
            if done % tc.log_every == 0 or done == tc.steps or record:
                record = {**(record or {}), "step": done, "loss": loss,
                          **{f"loss_layer{k}": float(v) for k, v in layer_loss.items()}}
                logger.log(record)
                history.append(record)
            if bar is not None:
                bar.update(done, loss=loss)
            if guard.requested:
                save(done)
                interrupted = True
                break
            if checkpointer.should_save(done) or done == tc.steps:
                save(done)
    if bar is not None:
        bar.close()
    checkpointer.close()
    train_s = time.perf_counter() - t0 - cache.seconds
    predictors = LeMoPredictors(config, block_size=tc.block_size, layer_ids=layer_ids,
                                widths=widths_of(params), dtype=config.compute_dtype,
                                rngs=nnx.Rngs(0))
    predictors.set_params(params)
    if not interrupted:
        save_predictors(predictors, workdir / "predictors", step=done, info=metadata)
    return PredictorRun(predictors, params_before, done, interrupted, history, cache.seconds,
                        train_s)
