"""Benchmarks: ``python -m experiments.bench.<name> --out FILE`` (see BENCHMARKS.md).

Importing this package (which ``python -m experiments.bench.<name>`` does before the benchmark module
imports jax) turns off XLA's concurrency-optimised CPU scheduler, without which rematerialisation has
no visible effect on compile-only memory (DESIGN.md). A value already in ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_enable_concurrency_optimized_scheduler=false")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(path: str | os.PathLike, benchmark: str, rows: list, summary: dict,
                 **extra) -> dict:
    """Write BENCHMARKS.md's JSON (benchmark, backend, device, jax, git, rows, summary, extras)."""
    import jax

    result = {"benchmark": benchmark, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "git": git_sha(),
              **extra, "rows": rows, "summary": summary}
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result
