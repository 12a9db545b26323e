"""Accelerator evidence in one command, ``make gpu-evidence``: about 9 minutes on one H100.

    python -m experiments.bench.gpu_evidence                 # on a GPU: bench_results/gpu_*.json
    python -m experiments.bench.gpu_evidence --dry_run       # anywhere, CPU, tiny shapes, ~2 min
    TOKENSPARSE_GIT_COMMIT=<sha> make gpu-evidence           # a copy of the tree with no .git

Stages, each a child process (a crash, a hang or an out-of-memory error loses that stage alone) with
its own time limit, its failure recorded and the next stage run:

1. ``kernels``: :mod:`experiments.bench.kernels` (segment attention vs cuDNN at 2K-32K, packed
   documents, LeMo block scoring) with the kernels' default settings: ``gpu_kernels.json``.
2. ``lemo_speed``: :mod:`experiments.bench.lemo_speed`'s fair rows (``--lemo_rows``; at least
   ``lora`` and ``lemo_elimination``) on ``llama2-7b`` widths with ``--lemo_n_layers`` (8 by
   default: compiles dominate the stage, so more layers buy little; the sparse layers are the same
   half of the stack as on 32 layers): 8K without remat, 16K and 32K with full remat, one process
   per length. Step times, tokens/s and the device's ``peak_bytes_in_use``:
   ``gpu_lemo_speed.json``.
3. ``subllm_speed``: :mod:`experiments.bench.subllm_speed`, ``subllm-1.3b`` vs its dense twin,
   training throughput at 4K and 8K (no decoding): ``gpu_subllm_speed.json``; then the decode rows
   of ``subllm-small`` vs its twin at 2K and 4K (the CPU benchmark's setting: capacity 0.75, θ
   per level, 48 teacher-forced tokens, the models alternating token by token; per-token speedup,
   per-depth medians, KV bytes): ``gpu_subllm_decode.json``.
4. ``kernel_tests``: pytest on the kernel test files with ``TOKENSPARSE_TEST_PLATFORM=gpu`` (the
   kernels compiled for the GPU, not interpreted): ``gpu_kernel_tests.json`` holds each test's
   outcome and the pass/fail counts. Last, so that it gets whatever time the others left
   (hypothesis draws many shapes, each compiling its own kernels).

``gpu_evidence.json`` sums up: every stage's status, wall time and limit; the device, jax and git
commit (``$TOKENSPARSE_GIT_COMMIT``, else ``git``, ``-dirty`` when tracked files differ); the kernel
settings the models' attention ran with (:func:`kernels_pallas.segment_attention.default_config`
for their head dim and dtype); and the GPU goals, each with its value, target and pass/fail:
LeMo (``lemo_elimination``, the fair row) step time >= 1.15x LoRA at 8K without remat and >= 1.3x at
32K with full remat; segment attention forward+backward >= 0.9x cuDNN at 8K. Every file carries the
device name and the commit.

``--dry_run`` (or ``TOKENSPARSE_GPU_EVIDENCE_DRY_RUN=1``) runs the same stages on CPU with tiny
shapes into ``workdirs/gpu_evidence_dry_run``: it checks the plumbing, its numbers mean nothing, and
its goals are evaluated on tiny lengths. Without it, a machine with no GPU is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

from absl import flags

from experiments import _checks
from experiments.bench import GIT_COMMIT_ENV, git_sha

DRY_RUN_ENV = "TOKENSPARSE_GPU_EVIDENCE_DRY_RUN"
STAGES = ("kernels", "lemo_speed", "subllm_speed", "kernel_tests")  # the order they run in

GPU_BUDGET_S = 515  # 8.6 minutes, less a few seconds for the orchestration around the stages

_DRY_RUN = flags.DEFINE_bool("dry_run", False, "CPU, tiny shapes: check the script end to end "
                             f"(also ${DRY_RUN_ENV}=1).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the gpu_*.json files go (default: "
                               "bench_results, or workdirs/gpu_evidence_dry_run with --dry_run).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Logs, per-run JSONs and the compilation cache "
                                "(default: workdirs/gpu_evidence[_dry_run]).")
_BUDGET = flags.DEFINE_integer("budget_s", None, "Wall-clock budget of all stages together, seconds "
                               "(default 515 on a GPU, 900 for the dry run); a stage's limit is its "
                               "share plus whatever earlier stages left unused.")
_STAGES = flags.DEFINE_list("stages", list(STAGES), "Stages to run.")
_N_LAYERS = flags.DEFINE_integer("lemo_n_layers", 8, "Layers of the llama2-7b-width model of the "
                                 "lemo_speed stage (the dry run uses 4 on the tiny preset).")
_LEMO_ROWS = flags.DEFINE_list("lemo_rows", ["lora", "lemo_elimination"], "lemo_speed's --rows: "
                               "fair-comparison rows to time (lora always runs).")

_checks.one_of(_STAGES, STAGES)
_checks.at_least(_N_LAYERS, 1)
_checks.at_least(_BUDGET, 60)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What each stage runs; :data:`GPU` on an accelerator, :data:`DRY` for the CPU dry run."""

    kernel_tests: tuple[str, ...]
    """pytest arguments: the kernel test files (or node ids)."""
    kernels_flags: tuple[str, ...]
    attention_goal_len: int
    """The length of the segment-attention vs cuDNN goal."""
    lemo_preset: str
    lemo_n_layers: int | None
    """None: ``--lemo_n_layers``."""
    lemo_runs: tuple[tuple[int, str], ...]
    """(seq_len, remat) per lemo_speed process; the first is the no-remat goal, the last the remat one."""
    lemo_flags: tuple[str, ...]
    subllm_preset: str
    subllm_runs: tuple[int, ...]
    subllm_flags: tuple[str, ...]
    subllm_decode_preset: str
    subllm_decode_lens: tuple[int, ...]
    """One decode-only run (``--train=false``) at these lengths, after the training runs."""
    subllm_decode_flags: tuple[str, ...]
    shares: dict
    """Seconds per stage run (a lemo or subllm run each), and for the device probe."""


GPU = Plan(
    kernel_tests=("tests/test_segment_attention.py", "tests/test_block_scores.py",
                  "tests/test_backends.py"),
    kernels_flags=("--seq_lens=2048,8192,16384,32768", "--kv_heads=8", "--reps=10",
                   "--baselines=library", "--kernels=segment_attention,block_scores",
                   "--score_seq_len=16384"),
    attention_goal_len=8192,
    lemo_preset="llama2-7b", lemo_n_layers=None,
    lemo_runs=((8192, "none"), (16384, "full"), (32768, "full")),
    lemo_flags=("--reps=5", "--warmup=1"),
    subllm_preset="subllm-1.3b", subllm_runs=(4096, 8192),
    subllm_flags=("--reps=5", "--warmup=1", "--decode_tokens=0"),
    subllm_decode_preset="subllm-small", subllm_decode_lens=(2048, 4096),
    subllm_decode_flags=("--train=false", "--decode_tokens=48"),
    # Estimates (no GPU run yet): each lemo/subllm run is dominated by compiling its two steps
    # (~20-40 s each at these widths), the decode run by compiling prefills and steps; the tests
    # come last and also get whatever is left.
    shares={"probe": 20, "kernels": 60, "lemo_speed": (75, 75, 90), "subllm_speed": (50, 50, 40),
            "kernel_tests": 50},
)

DRY = Plan(
    kernel_tests=("tests/test_block_scores.py::test_bad_arguments_are_rejected",
                  "tests/test_segment_attention.py::test_dense_causal_tile_skipping_schedule"),
    kernels_flags=("--smoke", "--kernels=block_scores", "--seq_lens=64", "--kv_heads=1",
                   "--heads=2", "--head_dim=16", "--reps=1", "--score_seq_len=128",
                   "--score_heads=2,1,16"),
    attention_goal_len=64,
    lemo_preset="tiny", lemo_n_layers=4,
    lemo_runs=((128, "none"), (256, "full")),
    lemo_flags=("--reps=1", "--warmup=1"),
    subllm_preset="subllm-tiny", subllm_runs=(128,),
    subllm_flags=("--reps=1", "--warmup=1", "--decode_tokens=0"),
    subllm_decode_preset="subllm-tiny", subllm_decode_lens=(128,),
    subllm_decode_flags=("--train=false", "--decode_tokens=4"),
    shares={"probe": 120, "kernels": 150, "lemo_speed": (150, 150), "subllm_speed": (150, 150),
            "kernel_tests": 150},
)

# Goals: (name, what, target). "lemo": LoRA / lemo_elimination step time at the first (no remat)
# or last (full remat) lemo run; "attention": cuDNN / ours, forward+backward, at the goal length.
GOALS = (("lemo_step_speedup_no_remat", ("lemo", 0), 1.15),
         ("lemo_step_speedup_remat", ("lemo", -1), 1.30),
         ("attention_fwd_bwd_vs_cudnn", ("attention", None), 0.90))
GOAL_ROW = "lemo_elimination"


# ----------------------------------------------------------------------------- the device probe


def probe(plan_name: str) -> None:
    """Print (one ``PROBE {json}`` line) what this process sees: the device, versions, missing
    packages, and the attention kernel settings the plan's models would run with."""
    import importlib.metadata
    import importlib.util
    import platform

    import jax

    info = {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "device_count": jax.device_count(), "jax": jax.__version__,
            "python": platform.python_version(),
            "missing_modules": [m for m in ("flax", "optax", "jaxtyping", "ml_collections",
                                            "absl", "pytest", "hypothesis", "matplotlib")
                                if importlib.util.find_spec(m) is None]}
    versions = {}
    for dist in ("jaxlib", "flax", "optax", "ml_collections", "triton"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    info["versions"] = versions
    stats = jax.devices()[0].memory_stats() or {}
    info["bytes_limit"] = stats.get("bytes_limit")
    try:
        import jax.numpy as jnp

        from kernels_pallas.segment_attention import default_config
        from tokensparse.config import preset
        from tokensparse.subllm.structure import subllm_preset

        plan = DRY if plan_name == "dry" else GPU
        dtype = jnp.bfloat16 if info["backend"] in ("gpu", "tpu") else jnp.float32
        settings = {}
        for name, model in ((plan.lemo_preset, preset(plan.lemo_preset)),
                            (plan.subllm_preset, subllm_preset(plan.subllm_preset).model)):
            cfg = default_config(model.head_dim, dtype)
            blocks = dataclasses.asdict(cfg.pop("blocks"))
            settings[name] = {"head_dim": model.head_dim, "dtype": jnp.dtype(dtype).name,
                              **blocks, **cfg}
        info["segment_attention_default_config"] = settings
    except Exception as e:  # recorded: the stages will show what it breaks
        info["kernel_settings_error"] = f"{type(e).__name__}: {e}"[:300]
    print("PROBE " + json.dumps(info), flush=True)


# ----------------------------------------------------------------------------- running stages


@dataclasses.dataclass
class Stage:
    name: str
    cmd: list
    timeout_s: float
    log: pathlib.Path
    status: str = "not run"
    returncode: int | None = None
    wall_s: float | None = None
    tail: str = ""

    def record(self) -> dict:
        out = {"stage": self.name, "status": self.status, "returncode": self.returncode,
               "wall_s": self.wall_s, "timeout_s": round(self.timeout_s, 1),
               "command": " ".join(["python", *self.cmd[1:]])}
        if self.status != "ok":
            out["log_tail"] = self.tail
        return out


def run_stage(stage: Stage, env: dict) -> Stage:
    """Run ``stage.cmd`` in its own process group, output to ``stage.log``, killed (the whole
    group) at ``stage.timeout_s``; status ok, failed (nonzero exit) or timeout."""
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with stage.log.open("w") as log:
        proc = subprocess.Popen(stage.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            stage.returncode = proc.wait(timeout=max(stage.timeout_s, 1))
            stage.status = "ok" if stage.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            stage.status = "timeout"
    stage.wall_s = round(time.perf_counter() - start, 1)
    stage.tail = stage.log.read_text(errors="replace")[-3000:]
    print(f"[{stage.name}] {stage.status} in {stage.wall_s:.0f} s (limit {stage.timeout_s:.0f} s)"
          f"; log {stage.log}", flush=True)
    if stage.status != "ok":
        print("\n".join(stage.tail.splitlines()[-15:]), flush=True)
    return stage


class Clock:
    """Stage limits from one budget: a stage gets its share plus what earlier stages left, while
    every later stage keeps its own share."""

    def __init__(self, budget_s: float, shares: list[float]):
        self.start = time.perf_counter()
        self.deadline = self.start + budget_s
        self.later = list(shares)

    def next_limit(self) -> float:
        share = self.later.pop(0)
        left = self.deadline - time.perf_counter()
        return max(min(share, left), left - sum(self.later))


def _python(*args: str) -> list:
    return [sys.executable, *args]


def _load(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- stage results


def kernel_test_outcomes(junit: pathlib.Path, log: pathlib.Path) -> dict[str, str]:
    """``{node id: passed | failed | error | skipped}`` from pytest's JUnit XML, or, when the run
    was cut short before writing it, from the ``-v`` lines of its log."""
    outcomes = {}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
            kinds = [child.tag for child in case]
            outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
            outcomes[node] = {"failure": "failed"}.get(outcome, outcome)
        return outcomes
    for line in log.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and "::" in parts[0] and parts[1] in ("PASSED", "FAILED", "ERROR",
                                                                 "SKIPPED"):
            outcomes[parts[0]] = parts[1].lower()
    return outcomes


def _header(benchmark: str, info: dict, commit: str) -> dict:
    return {"benchmark": benchmark, "backend": info.get("backend"), "device": info.get("device"),
            "jax": info.get("jax"), "git": commit}


def merge_runs(benchmark: str, runs: list[tuple[dict, Stage, dict | None]], info: dict,
               commit: str) -> dict:
    """One JSON from a benchmark's per-length runs: their rows, their summaries (keys suffixed with
    the run's remat policy where the run has one), and each run's stage record and settings."""
    rows, summary, records = [], {}, []
    for params, stage, result in runs:
        records.append({**params, **stage.record(),
                        **({"settings": result.get("settings")} if result else {})})
        if result is None:
            continue
        rows += result.get("rows", [])
        suffix = f"_remat_{params['remat']}" if "remat" in params else ""
        summary.update({f"{k}{suffix}": v for k, v in result.get("summary", {}).items()})
    return {**_header(benchmark, info, commit), "runs": records, "rows": rows, "summary": summary}


def lemo_summary(rows: list[dict]) -> dict:
    """Per length: LoRA / row step time for every LeMo row, and each row's device peak (rows warm
    up sparsest first, so ``lora``'s peak is the maximum over the rows; see lemo_speed)."""
    out = {}
    for t in sorted({r["seq_len"] for r in rows}):
        at = {r["method"]: r for r in rows if r["seq_len"] == t}
        tag = f"@{t}_remat_{next(iter(at.values()))['remat']}"
        for method, row in at.items():
            if "lora" in at and method != "lora":
                out[f"step_speedup_{method}{tag}"] = at["lora"]["step_s"] / row["step_s"]
            out[f"peak_bytes_after_warmup_{method}{tag}"] = row.get("peak_bytes_after_warmup")
            out[f"tokens_per_s_{method}{tag}"] = row.get("tokens_per_s")
    return out


def goals(plan: Plan, lemo: dict | None, kernels: dict | None, *, dry: bool = False) -> dict:
    """Every goal's value (None when its stage did not measure it), target and pass."""
    out = {}
    for name, (what, where), target in GOALS:
        if what == "lemo":
            t, remat = plan.lemo_runs[where]
            key = f"step_speedup_{GOAL_ROW}@{t}_remat_{remat}"
            value = (lemo or {}).get("summary", {}).get(key)
        else:
            key = f"fwd_bwd_vs_cudnn@{plan.attention_goal_len}"
            value = (kernels or {}).get("summary", {}).get(key)
        out[name] = {"key": key, "value": value, "target": target,
                     "pass": None if value is None else bool(value >= target),
                     **({"note": "dry run: tiny shapes on CPU, not evidence"} if dry else {})}
    return out


# ----------------------------------------------------------------------------- main


def _commit() -> str:
    """``$TOKENSPARSE_GIT_COMMIT``, else the checkout's short commit (``-dirty`` when tracked
    files differ from it), else ``unknown``."""
    sha = git_sha()
    if os.environ.get(GIT_COMMIT_ENV, "").strip() or sha == "unknown":
        return sha
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return sha
    return f"{sha}-dirty" if dirty else sha


def _write(path: pathlib.Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}", flush=True)


@dataclasses.dataclass
class Run:
    """One invocation's settings and what its stages have produced so far."""

    plan: Plan
    dry: bool
    out_dir: pathlib.Path
    work: pathlib.Path
    env: dict
    clock: Clock
    info: dict
    commit: str
    stages: list = dataclasses.field(default_factory=list)
    results: dict = dataclasses.field(default_factory=dict)
    errors: dict = dataclasses.field(default_factory=dict)
    """Stage name -> an exception raised while gathering its results (a bug in this script)."""

    def stage(self, name: str, cmd: list, log: str, env: dict | None = None) -> Stage:
        stage = run_stage(Stage(name, cmd, self.clock.next_limit(), self.work / log),
                          env or self.env)
        self.stages.append(stage)
        return stage


def kernels_cmd(plan: Plan, out: pathlib.Path) -> list:
    return _python("-m", "experiments.bench.kernels", f"--out={out}", *plan.kernels_flags)


def lemo_cmd(plan: Plan, t: int, remat: str, n_layers: int, rows: list, out: pathlib.Path) -> list:
    return _python("-m", "experiments.bench.lemo_speed", f"--preset={plan.lemo_preset}",
                   f"--n_layers={n_layers}", f"--seq_lens={t}", f"--remat={remat}",
                   f"--rows={','.join(rows)}", f"--out={out}", *plan.lemo_flags)


def subllm_cmd(plan: Plan, t: int, out: pathlib.Path) -> list:
    return _python("-m", "experiments.bench.subllm_speed", f"--preset={plan.subllm_preset}",
                   f"--seq_lens={t}", f"--out={out}", *plan.subllm_flags)


def subllm_decode_cmd(plan: Plan, out: pathlib.Path) -> list:
    return _python("-m", "experiments.bench.subllm_speed", f"--preset={plan.subllm_decode_preset}",
                   f"--seq_lens={','.join(map(str, plan.subllm_decode_lens))}", f"--out={out}",
                   *plan.subllm_decode_flags)


def kernels_stage(run: Run) -> None:
    path = run.out_dir / "gpu_kernels.json"
    path.unlink(missing_ok=True)
    stage = run.stage("kernels", kernels_cmd(run.plan, path), "kernels.log")
    result = _load(path)
    if result is None:  # the stage failed before writing: keep its failure in this file
        result = {**_header("kernels", run.info, run.commit), "rows": [], "summary": {}}
    result["stage"] = stage.record()
    run.results["kernels"] = result
    _write(path, result)


def lemo_stage(run: Run) -> None:
    runs, plan = [], run.plan
    layers = plan.lemo_n_layers or _N_LAYERS.value
    for t, remat in plan.lemo_runs:
        path = run.work / f"lemo_speed_{t}_{remat}.json"
        path.unlink(missing_ok=True)
        stage = run.stage(f"lemo_speed@{t}_remat_{remat}",
                          lemo_cmd(plan, t, remat, layers, _LEMO_ROWS.value, path),
                          f"lemo_speed_{t}_{remat}.log")
        runs.append(({"seq_len": t, "remat": remat}, stage, _load(path)))
    result = merge_runs("gpu_lemo_speed", runs, run.info, run.commit)
    result["summary"].update(lemo_summary(result["rows"]))
    result["model"] = {"preset": plan.lemo_preset, "n_layers": layers, "rows": _LEMO_ROWS.value,
                       "goal_row": GOAL_ROW}
    run.results["lemo_speed"] = result
    _write(run.out_dir / "gpu_lemo_speed.json", result)


def subllm_stage(run: Run) -> None:
    runs, plan = [], run.plan
    for t in plan.subllm_runs:
        path = run.work / f"subllm_speed_{t}.json"
        path.unlink(missing_ok=True)
        stage = run.stage(f"subllm_speed@{t}", subllm_cmd(plan, t, path), f"subllm_speed_{t}.log")
        runs.append(({"seq_len": t}, stage, _load(path)))
    run.results["subllm_speed"] = merge_runs("gpu_subllm_speed", runs, run.info, run.commit)
    _write(run.out_dir / "gpu_subllm_speed.json", run.results["subllm_speed"])
    path = run.work / "subllm_decode.json"
    path.unlink(missing_ok=True)
    lens = ",".join(map(str, plan.subllm_decode_lens))
    stage = run.stage(f"subllm_decode@{lens}", subllm_decode_cmd(plan, path), "subllm_decode.log")
    run.results["subllm_decode"] = merge_runs("gpu_subllm_decode", [({"seq_lens": lens}, stage, _load(path))],
                                              run.info, run.commit)
    _write(run.out_dir / "gpu_subllm_decode.json", run.results["subllm_decode"])


def kernel_tests_stage(run: Run) -> None:
    junit = run.work / "kernel_tests.xml"
    junit.unlink(missing_ok=True)
    stage = run.stage("kernel_tests", _python(
        "-m", "pytest", "-v", "-p", "no:xdist", "-p", "no:cacheprovider", f"--junitxml={junit}",
        *run.plan.kernel_tests), "kernel_tests.log",
        {**run.env, "TOKENSPARSE_TEST_PLATFORM": "cpu" if run.dry else "gpu"})
    outcomes = kernel_test_outcomes(junit, stage.log)
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "error",
                                                                  "skipped")}
    summary = {**counts, "total": len(outcomes), "status": stage.status,
               "all_pass": stage.status == "ok" and counts["failed"] + counts["error"] == 0
               and counts["passed"] > 0}
    run.results["kernel_tests"] = {
        **_header("gpu_kernel_tests", run.info, run.commit), "stage": stage.record(),
        "platform": "cpu (dry run: interpreted)" if run.dry else "gpu (compiled kernels)",
        "kernel_settings": "each test's own; the models' defaults are in gpu_evidence.json",
        "rows": [{"test": k, "outcome": v} for k, v in sorted(outcomes.items())],
        "summary": summary}
    _write(run.out_dir / "gpu_kernel_tests.json", run.results["kernel_tests"])


# The order stages run in (STAGES): the timings first, the tests last, where they get whatever time the
# others left (hypothesis draws many shapes, and each compiles its own kernels).
ORDER = {"kernels": kernels_stage, "lemo_speed": lemo_stage, "subllm_speed": subllm_stage,
         "kernel_tests": kernel_tests_stage}
assert tuple(ORDER) == STAGES


def summarize(run: Run, started: float) -> dict:
    """``gpu_evidence.json``: stages, device, commit, kernel settings, goals."""
    results, plan = run.results, run.plan
    goal = goals(plan, results.get("lemo_speed"), results.get("kernels"), dry=run.dry)
    passes = [g["pass"] for g in goal.values()]
    summary = {"dry_run": run.dry, "stages_ok": sum(s.status == "ok" for s in run.stages),
               "stages_not_ok": [s.name for s in run.stages if s.status != "ok"] + list(run.errors),
               "kernel_tests_all_pass": (results.get("kernel_tests") or {}).get(
                   "summary", {}).get("all_pass"),
               **{f"goal_{name}": g["pass"] for name, g in goal.items()},
               "all_goals_pass": None if None in passes else all(passes)}
    for name, stage_result in results.items():
        if name != "kernel_tests":
            summary.update({f"{name}:{k}": v for k, v in stage_result.get("summary", {}).items()
                            if "speedup" in k or "vs_cudnn" in k or "throughput_ratio" in k})
    kernels = results.get("kernels") or {}
    return {**_header("gpu_evidence", run.info, run.commit), "dry_run": run.dry,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1),
            "budget_s": round(run.clock.deadline - run.clock.start, 1), "probe": run.info,
            "kernel_settings": {
                "segment_attention_models": run.info.get("segment_attention_default_config"),
                "attention_backend_per_run": sorted({
                    f"{r.get('preset')}@{r.get('seq_len')}: {r.get('attention')}"
                    for name in ("lemo_speed", "subllm_speed")
                    for r in results.get(name, {}).get("rows", [])}),
                "kernels_benchmark": kernels.get("config"),
                "kernels_benchmark_source": kernels.get("config_source")},
            "lemo_model": {"preset": plan.lemo_preset,
                           "n_layers": plan.lemo_n_layers or _N_LAYERS.value,
                           "runs": [{"seq_len": t, "remat": r} for t, r in plan.lemo_runs]},
            "goals": goal, "errors": run.errors, "rows": [s.record() for s in run.stages],
            "summary": summary}


def main(argv):
    del argv
    dry = _DRY_RUN.value or os.environ.get(DRY_RUN_ENV, "") not in ("", "0")
    plan = DRY if dry else GPU
    out_dir = pathlib.Path(_OUT_DIR.value or ("workdirs/gpu_evidence_dry_run" if dry
                                              else "bench_results"))
    work = pathlib.Path(_WORK_DIR.value or ("workdirs/gpu_evidence" + ("_dry_run" if dry else "")))
    if work.resolve() == out_dir.resolve():
        work = work / "work"
    commit = _commit()
    env = {**os.environ, GIT_COMMIT_ENV: commit, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "JAX_COMPILATION_CACHE_DIR": str((work / "jax_cache").resolve())}
    if dry:
        env["JAX_PLATFORMS"] = "cpu"
    wanted = [name for name in ORDER if name in _STAGES.value]
    shares = [plan.shares["probe"]]
    for name in wanted:
        share = plan.shares[name]
        shares += list(share) if isinstance(share, tuple) else [share]
    started = time.time()
    run = Run(plan, dry, out_dir, work, env, Clock(_BUDGET.value or (900 if dry else GPU_BUDGET_S), shares),
              {}, commit)

    probe_stage = run.stage("probe", _python(
        "-c", f"from experiments.bench.gpu_evidence import probe; probe({'dry' if dry else 'gpu'!r})"),
        "probe.log")
    line = next((ln for ln in probe_stage.tail.splitlines() if ln.startswith("PROBE ")), None)
    run.info = json.loads(line[len("PROBE "):]) if line else {"error": probe_stage.tail[-500:]}
    print("device:", run.info.get("device"), "backend:", run.info.get("backend"), "jax:",
          run.info.get("jax"), "git:", commit, flush=True)
    if run.info.get("missing_modules"):
        print("missing Python packages (stages needing them will fail):",
              ", ".join(run.info["missing_modules"]), flush=True)
    if not dry and run.info.get("backend") != "gpu":
        _checks.fail(f"no GPU here (jax backend {run.info.get('backend')!r}; probe "
                     f"{probe_stage.status}): run with --dry_run, or on a GPU machine.")

    for name in wanted:
        try:
            ORDER[name](run)
        except Exception as e:  # a bug here must not cost the other stages their results
            print(f"[{name}] gathering its results failed: {type(e).__name__}: {e}", flush=True)
            run.errors[name] = f"{type(e).__name__}: {e}"[:500]

    result = summarize(run, started)
    _write(out_dir / "gpu_evidence.json", result)
    print(f"\n{'stage':<28} {'status':<8} {'wall s':>7} {'limit s':>8}")
    for s in run.stages:
        print(f"{s.name:<28} {s.status:<8} {s.wall_s or 0:>7.0f} {s.timeout_s:>8.0f}")
    for name, g in result["goals"].items():
        value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
        print(f"goal {name:<28} {g['key']:<45} {value:>7} >= {g['target']}: {g['pass']}")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    _checks.run(main)
