"""Side-by-side step timing for the benchmarks (BENCHMARKS.md: one process, interleaved, medians)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import jax
from flax import nnx


def timed_step(step: Callable, model, optimizer, batch) -> tuple[float, float]:
    """(seconds, loss) of one train step, clock read after everything the step updates is ready."""
    start = time.perf_counter()
    metrics = step(model, optimizer, batch)
    jax.block_until_ready((metrics, nnx.state(model), nnx.state(optimizer)))
    return time.perf_counter() - start, float(metrics["loss"])


def interleaved(runs: Mapping[str, Callable[[], float]], reps: int) -> dict[str, dict]:
    """Call every ``runs[name]() -> seconds`` ``reps`` times, the order rotating each repetition
    (AB BA AB … for two), so drift hits all alike; returns ``{name: {"times_s", "median_s"}}``."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(runs[name]())
    return {name: {"times_s": t, "median_s": statistics.median(t)} for name, t in times.items()}
