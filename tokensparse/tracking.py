"""Where a training run's records go: ``metrics.jsonl``, TensorBoard event files, optionally W&B.

One record is a flat dict with an integer ``step`` and numbers (loss, grad_norm, lr, tokens_per_s,
compile_s, val_loss, ...). :class:`Tracker` writes it to

- ``workdir/metrics.jsonl``: one JSON object per line (the file the pipelines, the benchmarks and
  ``python -m experiments.plots RUN_DIR`` read);
- ``workdir/tensorboard/``: TensorBoard event files (``tensorboard --logdir RUN_DIR``), one scalar
  per numeric field under the field's own name, written with tensorboardX (a dependency; when it
  is missing the events are skipped with a one-line warning). A resumed run writes a new event file
  whose purge marker makes TensorBoard drop the old file's events at and after the resumed step,
  as ``metrics.jsonl`` drops its records;
- a Weights & Biases run, only when ``wandb_project`` is set (wandb must then be installed). The
  run's id is kept in ``workdir/wandb_run_id``, so a resumed training run continues the same W&B run.

In a multi-process run only process 0 writes; every other process's tracker does nothing.
"""

from __future__ import annotations

import math
import os
import pathlib
import warnings
from typing import Any

import jax

from tokensparse.metrics import JsonlLogger

TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """The finite numeric fields of ``record`` other than ``step``, as floats."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            out[key] = number
    return out


class TensorBoardWriter:
    """Scalars into TensorBoard event files in ``logdir`` (tensorboardX)."""

    def __init__(self, logdir: pathlib.Path, *, start_step: int = 0):
        from tensorboardX import SummaryWriter

        # purge_step: TensorBoard discards events at and after it from earlier files (a resume);
        # the suffix keeps a resume within the same second from reusing the earlier file's name.
        self.writer = SummaryWriter(logdir=str(logdir), purge_step=start_step or None,
                                    filename_suffix=f".{start_step}.{os.getpid()}")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """The record's scalars into a W&B run (``wandb`` imported only when asked for)."""

    def __init__(self, workdir: pathlib.Path, project: str, config: dict[str, Any] | None):
        try:
            import wandb
        except ImportError:
            raise ValueError(f"TrainConfig.wandb_project={project!r} needs wandb: pip install wandb "
                             "(or leave wandb_project empty).") from None
        id_file = workdir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        self.wandb = wandb
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(workdir),
                              name=workdir.name, config=config or {})

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """Writes each training record to ``metrics.jsonl`` and the enabled trackers (process 0 only).

    ``start_step``: the step the run resumes from (0: fresh); ``config``: the run's settings, for
    W&B. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True,
                 wandb_project: str = "", start_step: int = 0,
                 config: dict[str, Any] | None = None):
        self.workdir = pathlib.Path(workdir)
        self.jsonl = JsonlLogger(self.workdir / "metrics.jsonl")
        self.active = jax.process_index() == 0
        self.writers: list[TensorBoardWriter | WandbWriter] = []
        if not self.active:
            return
        if tensorboard:
            try:
                self.writers.append(TensorBoardWriter(self.workdir / TENSORBOARD_DIR,
                                                      start_step=start_step))
            except ImportError:
                warnings.warn("tensorboardX is not installed: no TensorBoard events (pip install "
                              "tensorboardX, or set train.tensorboard=False).", RuntimeWarning,
                              stacklevel=2)
        if wandb_project:
            self.writers.append(WandbWriter(self.workdir, wandb_project, config))

    def log(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        self.jsonl.log(record)
        scalars = _scalars(record)
        for writer in self.writers:
            writer.log(int(record["step"]), scalars)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
