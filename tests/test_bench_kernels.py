"""``experiments.bench.kernels`` on CPU: no timings reported, a correctness sweep instead, flag checks."""

import json
import pathlib
import subprocess
import sys

from _env import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = subprocess_env()
    return subprocess.run([sys.executable, "-m", "experiments.bench.kernels", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_cpu_run_is_a_correctness_sweep_and_smoke_covers_the_timing_path(tmp_path):
    out = tmp_path / "k.json"
    done = _run(f"--out={out}", "--smoke", "--kernels=segment_attention,block_scores",
                "--seq_lens=64", "--kv_heads=1", "--heads=2", "--head_dim=16", "--reps=1",
                "--score_seq_len=128", "--score_heads=2,1,16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not meaningful" in done.stdout
    result = json.loads(out.read_text())
    assert result["benchmark"] == "kernels" and result["backend"] == "cpu"
    sweep = result["correctness"]
    assert {r["kernel"] for r in sweep} == {"segment_attention", "block_scores"}
    assert {r["case"] for r in sweep} >= {"packed", "compacted", "no_visible_key", "causal", "full"}
    assert all(r["pass"] and r["finite"] for r in sweep), sweep
    summary = result["summary"]
    assert summary["correctness_all_pass"] is True
    assert 0 < summary["correctness_max_rel_err_float32"] <= 1e-5
    # The GPU timing code ran (interpreted), but no CPU timing is reported as a result.
    timed = {(r.get("what", "attention"), r["impl"]) for r in result["rows"] if "error" not in r}
    assert timed >= {("attention", "pallas"), ("attention", "library"), ("attention", "xla"),
                     ("block_scores", "pallas"), ("block_scores", "dense")}
    assert not any("vs_" in key for key in summary), summary
    score = next(r for r in result["rows"] if r.get("impl") == "pallas" and "what" in r)
    assert score["rel_err_vs_reference"] <= 2e-2


def test_bad_flags_fail_before_running(tmp_path):
    done = _run(f"--out={tmp_path / 'k.json'}", "--seq_lens=abc", timeout=120)
    assert done.returncode != 0 and "seq_lens" in done.stderr
    done = _run(f"--out={tmp_path / 'k.json'}", "--kernels=flash", timeout=120)
    assert done.returncode != 0 and "kernels" in done.stderr
    assert not (tmp_path / "k.json").exists()
