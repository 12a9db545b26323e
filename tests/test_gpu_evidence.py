"""``experiments.bench.gpu_evidence`` (``make gpu-evidence``): its pieces, its refusal off a GPU, and
(slow) its CPU dry run end to end."""

import json
import pathlib
import subprocess
import sys
import time

import pytest
from _env import subprocess_env

from experiments.bench import gpu_evidence as ge

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = ("gpu_evidence", "gpu_kernel_tests", "gpu_kernels", "gpu_lemo_speed", "gpu_subllm_speed",
         "gpu_subllm_decode")

FAKE_TESTS = """
import pytest

@pytest.fixture
def broken():
    raise RuntimeError("set-up fails")

def test_pass():
    pass

@pytest.mark.parametrize("x", [1, 2])
def test_param(x):
    assert x == 1

def test_skip():
    pytest.skip("not here")

def test_error(broken):
    pass
"""
FAKE_OUTCOMES = {"test_fake.py::test_pass": "passed", "test_fake.py::test_param[1]": "passed",
                 "test_fake.py::test_param[2]": "failed", "test_fake.py::test_skip": "skipped",
                 "test_fake.py::test_error": "error"}


def _evidence(*args, cwd=ROOT, timeout=900, env=None):
    return subprocess.run([sys.executable, "-m", "experiments.bench.gpu_evidence", *args], cwd=cwd,
                          env=env or subprocess_env(), capture_output=True, text=True,
                          timeout=timeout)


def test_test_outcomes_are_read_from_junit_and_from_a_log_cut_short(tmp_path):
    (tmp_path / "test_fake.py").write_text(FAKE_TESTS)
    junit, log = tmp_path / "out.xml", tmp_path / "out.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                        "-p", "no:xdist", f"--junitxml={junit}", "test_fake.py"], cwd=tmp_path,
                       stdout=out, stderr=subprocess.STDOUT, env=subprocess_env(), timeout=120)
    assert ge.kernel_test_outcomes(junit, log) == FAKE_OUTCOMES
    junit.unlink()  # as when the stage is killed before pytest writes its report
    assert ge.kernel_test_outcomes(junit, log) == FAKE_OUTCOMES


def test_a_hung_stage_is_killed_at_its_limit_and_a_failing_one_recorded(tmp_path):
    hang = ge.Stage("hang", [sys.executable, "-c", "print('started', flush=True); "
                             "import time; time.sleep(120)"], timeout_s=3, log=tmp_path / "h.log")
    start = time.perf_counter()
    ge.run_stage(hang, subprocess_env())
    assert time.perf_counter() - start < 60
    assert hang.status == "timeout" and "started" in hang.tail
    record = hang.record()
    assert record["status"] == "timeout" and "started" in record["log_tail"]
    fail = ge.run_stage(ge.Stage("fail", [sys.executable, "-c", "raise SystemExit(3)"],
                                 timeout_s=60, log=tmp_path / "f.log"), subprocess_env())
    assert (fail.status, fail.returncode) == ("failed", 3)
    ok = ge.run_stage(ge.Stage("ok", [sys.executable, "-c", "print('fine')"], timeout_s=60,
                               log=tmp_path / "o.log"), subprocess_env())
    assert ok.status == "ok" and "log_tail" not in ok.record()


def test_clock_passes_unused_time_on_and_never_passes_the_deadline(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(ge.time, "perf_counter", lambda: now[0])
    clock = ge.Clock(100, [10, 20, 30])
    assert clock.next_limit() == 50  # 100 s, of which the later stages need 50
    now[0] = 5.0  # the first stage used 5 s
    assert clock.next_limit() == 65  # 95 left, 30 kept for the last stage
    now[0] = 95.0  # the second overran what the last one needed
    assert clock.next_limit() == 5  # what is left, not its share


def test_lemo_summary_and_goals():
    rows = [{"seq_len": 128, "remat": "none", "method": "lora", "step_s": 3.0,
             "peak_bytes_after_warmup": 30, "tokens_per_s": 1.0},
            {"seq_len": 128, "remat": "none", "method": "lemo_elimination", "step_s": 2.0,
             "peak_bytes_after_warmup": 20, "tokens_per_s": 1.5},
            {"seq_len": 256, "remat": "full", "method": "lora", "step_s": 1.2},
            {"seq_len": 256, "remat": "full", "method": "lemo_elimination", "step_s": 1.0}]
    summary = ge.lemo_summary(rows)
    assert summary["step_speedup_lemo_elimination@128_remat_none"] == pytest.approx(1.5)
    assert summary["step_speedup_lemo_elimination@256_remat_full"] == pytest.approx(1.2)
    assert summary["peak_bytes_after_warmup_lemo_elimination@128_remat_none"] == 20
    goal = ge.goals(ge.DRY, {"summary": summary}, None)
    assert goal["lemo_step_speedup_no_remat"]["pass"] is True  # 1.5 >= 1.15
    assert goal["lemo_step_speedup_remat"]["pass"] is False  # 1.2 < 1.3
    assert goal["attention_fwd_bwd_vs_cudnn"] == {"key": "fwd_bwd_vs_cudnn@64", "value": None,
                                                  "target": 0.9, "pass": None}
    kernels = {"summary": {"fwd_bwd_vs_cudnn@8192": 0.95}}
    assert ge.goals(ge.GPU, None, kernels)["attention_fwd_bwd_vs_cudnn"]["pass"] is True


def test_the_gpu_plans_commands_parse(tmp_path):
    """Every benchmark the GPU run starts accepts the flags it is given (the GPU plan cannot run
    here): with an invalid --reps appended, each fails on that flag alone, after parsing the rest
    (--reps=-1: no benchmark accepts it; subllm_speed takes 0, compile-only)."""
    out = tmp_path / "x.json"
    commands = [ge.kernels_cmd(ge.GPU, out), ge.subllm_cmd(ge.GPU, ge.GPU.subllm_runs[-1], out),
                ge.subllm_decode_cmd(ge.GPU, out)]
    commands += [ge.lemo_cmd(ge.GPU, t, remat, 8, ["lora", "lemo_elimination"], out)
                 for t, remat in (ge.GPU.lemo_runs[0], ge.GPU.lemo_runs[-1])]
    for cmd in commands:
        done = subprocess.run([*cmd, "--reps=-1"], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=300)
        errors = [ln for ln in done.stderr.splitlines() if "FATAL Flags parsing error" in ln]
        assert done.returncode != 0 and len(errors) == 1 and "--reps=-1" in errors[0], (
            cmd, done.stderr[-2000:])
    assert not out.exists()


def test_without_a_gpu_it_refuses_and_writes_nothing(tmp_path):
    done = _evidence(f"--out_dir={tmp_path / 'out'}", f"--work_dir={tmp_path / 'work'}",
                     timeout=300)
    assert done.returncode != 0 and "no GPU here" in done.stderr, done.stderr[-2000:]
    assert "--dry_run" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_flags_fail_before_running(tmp_path):
    done = _evidence("--dry_run", "--stages=kernel_tests,flash", f"--out_dir={tmp_path}",
                     timeout=120)
    assert done.returncode != 0 and "stages" in done.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_dry_run_writes_every_json_with_device_commit_settings_and_goals(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**subprocess_env(), "TOKENSPARSE_GIT_COMMIT": "feedbee"}
    done = _evidence("--dry_run", f"--out_dir={out}", f"--work_dir={work}", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in FILES}
    for name, result in results.items():
        assert {"benchmark", "backend", "device", "jax", "git", "rows", "summary"} <= set(result), name
        assert result["git"] == "feedbee" and result["device"] == "cpu", name

    evidence = results["gpu_evidence"]
    stages = {row["stage"]: row for row in evidence["rows"]}
    assert set(stages) == {"probe", "kernel_tests", "kernels", "lemo_speed@128_remat_none",
                           "lemo_speed@256_remat_full", "subllm_speed@128", "subllm_decode@128"}
    assert all(row["status"] == "ok" and row["wall_s"] <= row["timeout_s"]
               for row in stages.values()), stages
    assert evidence["dry_run"] is True and evidence["summary"]["stages_not_ok"] == []
    assert set(evidence["goals"]) == {name for name, _, _ in ge.GOALS}
    for goal in evidence["goals"].values():
        assert {"key", "value", "target", "pass"} <= set(goal)
    lemo_goal = evidence["goals"]["lemo_step_speedup_no_remat"]
    assert lemo_goal["value"] > 0 and lemo_goal["pass"] == (lemo_goal["value"] >= 1.15)
    settings = evidence["kernel_settings"]["segment_attention_models"]["tiny"]
    assert {"block_q", "block_k", "num_warps", "num_stages", "num_stages_bwd"} <= set(settings)
    assert evidence["kernel_settings"]["kernels_benchmark_source"] == "default_config"

    tests = results["gpu_kernel_tests"]["summary"]
    assert tests["total"] == len(ge.DRY.kernel_tests) == tests["passed"] and tests["all_pass"]

    lemo = results["gpu_lemo_speed"]
    assert {(r["seq_len"], r["remat"], r["method"]) for r in lemo["rows"]} == {
        (t, remat, m) for t, remat in ge.DRY.lemo_runs for m in ("lora", "lemo_elimination")}
    assert all(r["step_s"] > 0 and "peak_bytes_after_warmup" in r for r in lemo["rows"])
    assert lemo["model"]["n_layers"] == 4 and len(lemo["runs"]) == 2

    subllm = results["gpu_subllm_speed"]
    assert {r["model"] for r in subllm["rows"]} == {"dense", "subllm"}
    assert subllm["summary"]["train_throughput_ratio@128"] > 0
    decode = results["gpu_subllm_decode"]
    assert {(r["model"], r["seq_len"]) for r in decode["rows"]} == {("dense", 128), ("subllm", 128)}
    assert decode["summary"]["decode_speedup@128"] > 0 and "kv_allocated_ratio@128" in decode["summary"]
    assert evidence["summary"]["subllm_decode:decode_speedup@128"] == decode["summary"]["decode_speedup@128"]
    assert results["gpu_kernels"]["config_source"] == "default_config"
