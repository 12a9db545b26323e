"""The training loop: resumable, interruptible, and loud about divergence.

State saved at each checkpoint: the trained parameters (all, or only LoRA), the optimizer state, the
model's RNG streams, and metadata (step, data position, configs). Batches are a pure function of the
step (``batches.batch(step)``), so resuming at step s continues the exact same sequence of batches:
N steps straight and N/2 + N/2 across a process restart give identical losses. ``metrics.jsonl``
keeps one record per step: on resume, records logged after the restored checkpoint (by a run killed
before its next save) are dropped, and the resumed run logs those steps again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from tokensparse import sharding, tracking, train
from tokensparse.checkpoint import Checkpointer, CheckpointError, InterruptGuard
from tokensparse.config import TrainConfig
from tokensparse.metrics import Progress


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left as the latest."""


@dataclasses.dataclass
class LoopResult:
    step: int  # the number of completed steps
    interrupted: bool
    history: list[dict[str, Any]]
    signal: str | None = None  # what interrupted the run ("SIGTERM", "SIGINT"), if anything


MODEL_KEYS = ("model", "subllm")  # metadata sections that define the parameter tree


def _check_same_model(saved: dict, current: dict, directory) -> None:
    for key in MODEL_KEYS:
        old, new = saved.get(key) or {}, current.get(key) or {}
        if old != new:
            diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise CheckpointError(
                f"checkpoint in {directory} was written for another model ({key} fields differ: "
                f"{diffs}); use a fresh --workdir or the matching config.")


def check_resumable(workdir: str | pathlib.Path, metadata: dict[str, Any]) -> int | None:
    """The step a run in ``workdir`` would resume from (None: fresh), after checking that its
    checkpoint was written for the same model; call it before writing anything into ``workdir``."""
    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return None
    with Checkpointer(directory, save_every=1) as checkpointer:
        step = checkpointer.latest_step()
        if step is not None:
            saved = checkpointer.restore_metadata()
            _check_same_model(saved, metadata, directory)
            step = int(saved.get("step", step))
    return step


def truncate_log(path: str | pathlib.Path, step: int) -> None:
    """Keep the records of ``path`` (JSON lines, each with a ``step``) up to ``step``: a run that
    resumes from ``step`` logs the later ones again. A line without a readable step (cut by a kill)
    is dropped. Atomic (write, then rename); process 0 only."""
    path = pathlib.Path(path)
    if jax.process_index() != 0 or not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float) and (
                record["step"] <= step):
            kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _diverged(loss: float, step: int, checkpointer: Checkpointer, workdir: pathlib.Path,
              tc: TrainConfig) -> TrainingDiverged:
    last = checkpointer.latest_step()
    remedy = "lower the learning rate" + ("" if tc.grad_clip else " or enable grad_clip")
    where = (f"the last good checkpoint is step {last} in {workdir / 'checkpoints'}"
             if last is not None else "no checkpoint was saved yet")
    return TrainingDiverged(f"loss is {loss} at step {step}; not saving: {where} ({remedy}, then "
                            "rerun; train.allow_changed_resume=True resumes with the new settings).")


def train_loop(
    *,
    workdir: str | pathlib.Path,
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    train_step: Callable,
    batches,
    tc: TrainConfig,
    wrt=nnx.Param,
    metadata: dict[str, Any] | None = None,
    eval_fn: Callable[[nnx.Module], dict[str, float]] | None = None,
    progress: bool = True,
    lr_schedule: Callable[[int], Any] | None = None,
) -> LoopResult:
    """Train to ``tc.steps``, resuming from ``workdir/checkpoints`` when it holds a checkpoint.

    ``wrt`` selects the trained (and checkpointed) parameters. ``metadata`` (JSON-able; include the
    model config under ``"model"``) is saved with every checkpoint and checked on resume.
    SIGTERM / Ctrl-C save a checkpoint at the current step before returning ``interrupted=True``.

    Records (``metrics.jsonl``, TensorBoard, W&B: :class:`tokensparse.tracking.Tracker`, process 0
    only) are written every ``tc.log_every`` steps, at every ``tc.eval_every``-th step (with
    ``eval_fn``'s results as ``val_*``) and at the last step: ``step``, ``loss`` and ``grad_norm``
    of that step, ``lr`` (``lr_schedule``, default :func:`tokensparse.train.learning_rate_schedule`,
    at that step's update), ``tokens_per_s`` over the steady steps since the previous record
    (evaluation and checkpoint writing excluded; absent when there were none), and in the process's
    first record ``compile_s``: the wall time of its first step, compilation included, which
    ``tokens_per_s`` never counts. The step's metrics stay on the device between records: the host
    waits for them only when it writes a record or a checkpoint (where a NaN or infinite loss of
    any step since the last fetch stops the run before saving), and once after the first step.
    """
    workdir = pathlib.Path(workdir)
    metadata = dict(metadata or {})
    schedule = lr_schedule if lr_schedule is not None else train.learning_rate_schedule(tc)
    checkpointer = Checkpointer(workdir / "checkpoints", save_every=tc.checkpoint_every,
                                keep=tc.keep_checkpoints)
    log_path = workdir / "metrics.jsonl"

    def state_now():  # the Checkpointer stores typed PRNG keys as key data and re-wraps them
        return {"params": nnx.state(model, wrt), "opt": nnx.state(optimizer),
                "rng": nnx.state(model, nnx.RngState)}

    def save(step: int, force: bool) -> None:
        checkpointer.save(step, state_now(), {**metadata, "step": step, "data_step": step},
                          force=force)

    start = 0
    if checkpointer.latest_step() is not None:
        saved_meta = checkpointer.restore_metadata()
        _check_same_model(saved_meta, metadata, workdir / "checkpoints")
        restored, saved_meta = checkpointer.restore(state_now())
        nnx.update(model, restored["params"], restored["rng"])
        nnx.update(optimizer, restored["opt"])
        start = int(saved_meta["data_step"])
    truncate_log(log_path, start)  # a fresh run (start 0) starts a fresh log
    tracker = tracking.Tracker(workdir, tensorboard=tc.tensorboard, wandb_project=tc.wandb_project,
                               start_step=start, config=metadata)

    history: list[dict[str, Any]] = []
    bar = Progress(tc.steps, start=start, every=tc.log_every) if progress else None
    pending: list[tuple[int, Any]] = []  # (step number, its metrics on the device) since the last fetch
    compile_s: float | None = None
    tokens, steady, t_since = 0, 0, time.perf_counter()  # the steady steps since the last record

    def fetch() -> dict[str, float]:
        """The pending steps' metrics on the host (one transfer); raises on a non-finite loss."""
        host = jax.device_get([metrics for _, metrics in pending])
        for (done, _), metrics in zip(pending, host, strict=True):
            loss = float(metrics["loss"])
            if not math.isfinite(loss):
                raise _diverged(loss, done - 1, checkpointer, workdir, tc)
        pending.clear()
        return host[-1]

    interrupted = False
    completed = start
    # Whether a signal reached any process is a collective (a host sync of every process); with
    # several processes it is asked only at the steps that sync anyway (a record, an evaluation, a
    # checkpoint), so the steps between stay asynchronous. One process asks at every step.
    several = jax.process_count() > 1
    with InterruptGuard() as guard, tracker:
        for step in range(start, tc.steps):
            batch = batches.batch(step)
            if compile_s is None:  # the process's first step: compilation, timed on its own
                t0 = time.perf_counter()
                metrics = jax.block_until_ready(train_step(model, optimizer, batch))
                compile_s = time.perf_counter() - t0
                t_since = time.perf_counter()
            else:
                metrics = train_step(model, optimizer, batch)
                tokens += int(batch.tokens.size)
                steady += 1
            done = completed = step + 1
            pending.append((done, metrics))
            log_now = done % tc.log_every == 0 or done == tc.steps
            eval_now = eval_fn is not None and tc.eval_every and done % tc.eval_every == 0
            save_due = checkpointer.should_save(done) or done == tc.steps
            # A signal to one process stops all, at the same step.
            stop = (log_now or eval_now or save_due or not several) and sharding.any_process(
                guard.requested)
            save_now = stop or save_due
            if not (log_now or eval_now or save_now):
                continue
            last = fetch()  # waits for the device: the clock below covers all of its work
            if log_now or eval_now:
                elapsed = time.perf_counter() - t_since
                record = {"step": done, "loss": float(last["loss"]),
                          "grad_norm": float(last["grad_norm"]), "lr": float(schedule(done - 1))}
                if steady:
                    record["tokens_per_s"] = tokens / max(elapsed, 1e-9)
                if not history:
                    record["compile_s"] = compile_s
                if eval_now:
                    record.update({f"val_{k}": v for k, v in eval_fn(model).items()})
                tracker.log(record)
                history.append(record)
                if bar is not None:
                    bar.update(done, loss=record["loss"])
            if stop:
                save(done, force=True)
                interrupted = True
                break
            t_pause = time.perf_counter()
            if checkpointer.should_save(done) or done == tc.steps:
                save(done, force=True)
            if log_now or eval_now:  # the next window starts now: evaluation and saving excluded
                tokens, steady, t_since = 0, 0, time.perf_counter()
            else:  # a checkpoint between records: writing it is not training time
                t_since += time.perf_counter() - t_pause
    if bar is not None:
        bar.close()
    checkpointer.close()
    return LoopResult(step=completed, interrupted=interrupted, history=history,
                      signal=guard.signal_name if interrupted else None)
