"""Benchmarks: ``python -m experiments.bench.<name> --out FILE``; each writes a JSON (settings, rows,
summary, the device and git commit) and its figure.

Importing this package (which ``python -m experiments.bench.<name>`` does before the benchmark module
imports jax) turns off XLA's concurrency-optimised CPU scheduler, without which rematerialisation has
no visible effect on compile-only memory, unless ``XLA_FLAGS`` already sets it; other flags there are
kept.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler"
if _SCHEDULER not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_SCHEDULER}=false".strip()


GIT_COMMIT_ENV = "TOKENSPARSE_GIT_COMMIT"


def git_sha() -> str:
    """The checkout's short commit; ``$TOKENSPARSE_GIT_COMMIT`` when set (a copy of the tree with no
    ``.git``, such as an accelerator machine's, is told it by whoever starts the run)."""
    if os.environ.get(GIT_COMMIT_ENV, "").strip():
        return os.environ[GIT_COMMIT_ENV].strip()
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(path: str | os.PathLike, benchmark: str, rows: list, summary: dict, *,
                 png: str | os.PathLike | bool | None = None, **extra) -> dict:
    """Write BENCHMARKS.md's JSON (benchmark, backend, device, jax, git, rows, summary, extras),
    then its figure (:mod:`experiments.plots`) to ``png`` (default: ``path`` with ``.png``;
    ``False``: none). A missing matplotlib skips the figure with a one-line notice."""
    import jax

    result = {"benchmark": benchmark, "backend": jax.default_backend(),
              "device": jax.devices()[0].device_kind, "jax": jax.__version__, "git": git_sha(),
              **extra, "rows": rows, "summary": summary}
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if png is not False:
        from experiments import plots

        notice = plots.plot(result, out.with_suffix(".png") if png in (None, True) else png)
        if not notice.startswith("no figure"):
            print(notice)
    return result


def loss_history(run_dir: str | os.PathLike) -> dict | None:
    """``{"step": [...], "loss": [...]}`` from a run's ``metrics.jsonl`` (one entry per logged step;
    a step logged twice, by a run resumed from an earlier checkpoint, keeps its last value), or
    None when the run logged nothing. Compact enough for a benchmark row; the loss-curve figures
    are drawn from it."""
    metrics = pathlib.Path(run_dir) / "metrics.jsonl"
    if not metrics.exists():
        return None
    losses = {}
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[int(record["step"])] = float(record["loss"])
    steps = sorted(losses)
    return {"step": steps, "loss": [losses[s] for s in steps]} if steps else None


def read_keep_profile(path: str | os.PathLike) -> tuple[float, ...]:
    """The per-layer keep ratios in a JSON file's ``"profile"`` (a ``lemo_profile.json`` written by
    an Algorithm 1 fine-tuning run or by :func:`tokensparse.lemo.profiles.sensitivity.budget_profile`'s
    caller); a clear error when the file or the key is missing."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ValueError(f"--lemo_profile={path}: no such file.")
    try:
        profile = json.loads(path.read_text())["profile"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"--lemo_profile={path} must be JSON with a \"profile\" list of per-layer "
                         "keep ratios.") from None
    return tuple(float(r) for r in profile)
