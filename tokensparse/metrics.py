"""Compile-only cost metrics from XLA: memory (activations, arguments, outputs) and FLOPs.

Compile-only numbers are deterministic and need no allocation, so they work for 7B shapes on a CPU.
On CPU, set ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` before importing jax,
or rematerialisation has no visible effect on ``temp_bytes``.
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class CompiledCost:
    temp_bytes: int  # activations + workspace
    argument_bytes: int  # parameters, optimizer state, batch
    output_bytes: int
    alias_bytes: int  # outputs that reuse (donated) argument buffers
    flops: float

    @property
    def total_bytes(self) -> int:
        return self.temp_bytes + self.argument_bytes + self.output_bytes - self.alias_bytes


def compiled_memory(fn, *args, **kwargs) -> CompiledCost:
    """Lower and compile ``fn(*args, **kwargs)`` (a ``jax.jit``-ed function or a plain callable)."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args, **kwargs).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returns one dict per computation
        cost = cost[0] if cost else {}
    return CompiledCost(
        temp_bytes=int(mem.temp_size_in_bytes),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        flops=float((cost or {}).get("flops", 0.0)),
    )
