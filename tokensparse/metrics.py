"""Compile-only cost metrics from XLA: memory (activations, arguments, outputs) and FLOPs.

Compile-only numbers are deterministic and need no allocation, so they work for 7B shapes on a CPU.
On CPU, set ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` before importing jax,
or rematerialisation has no visible effect on ``temp_bytes``.
"""

from __future__ import annotations

import dataclasses

import jax

from tokensparse.flops import compiled_flops


@dataclasses.dataclass(frozen=True)
class CompiledCost:
    temp_bytes: int  # activations + workspace
    argument_bytes: int  # parameters, optimizer state, batch
    output_bytes: int
    alias_bytes: int  # outputs that reuse (donated) argument buffers
    flops: float  # matmul FLOPs, every loop iteration counted (tokensparse.flops)

    @property
    def total_bytes(self) -> int:
        return self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes


def compiled_memory(fn, *args, **kwargs) -> CompiledCost:
    """Lower and compile ``fn(*args, **kwargs)`` (a ``jax.jit``-ed function or a plain callable)."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args, **kwargs).compile()
    mem = compiled.memory_analysis()
    return CompiledCost(
        temp_bytes=int(mem.temp_size_in_bytes),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        flops=compiled_flops(compiled),
    )


def block(tree):
    """Wait for every array in ``tree`` (timings must not stop the clock before the work is done)."""
    return jax.block_until_ready(tree)


def median_seconds(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn(*args)`` after ``warmup`` calls (compile excluded), blocking each."""
    import statistics
    import time

    for _ in range(warmup):
        block(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class JsonlLogger:
    """Appends one JSON object per call to a file (``metrics.jsonl``), flushed immediately.

    With several processes (``jax.distributed``) only process 0 writes: they all log the same
    (global) values into a shared workdir."""

    def __init__(self, path):
        import pathlib

        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        import json

        if jax.process_index() != 0:
            return
        clean = {k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")


class Progress:
    """A one-line progress display on stderr: step, loss, tokens/s and ETA (quiet when not a TTY
    unless ``force``; then it prints a plain line every ``every`` updates)."""

    def __init__(self, total: int, *, start: int = 0, every: int = 10, force: bool = False):
        import sys
        import time

        self.total, self.start, self.every = total, start, every
        self.t0 = time.perf_counter()
        self.stream = sys.stderr
        self.tty = self.stream.isatty() or force

    def update(self, step: int, **values: float) -> None:
        import time

        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        parts = [f"step {step}/{self.total}"] + [f"{k} {v:.4g}" for k, v in values.items()]
        line = "  ".join(parts) + f"  eta {eta:,.0f}s"
        if self.tty:
            self.stream.write("\r" + line + " " * 8)
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(line + "\n")

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
