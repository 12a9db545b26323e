"""``experiments.bench.kernels`` on CPU: no timings reported, a correctness sweep instead, flag checks;
the smoke's rows: kernel settings, the commit, and FLOPs counted over the pairs the mask keeps."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _env import subprocess_env

from kernels_pallas.reference import visible

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = {**subprocess_env(), "TOKENSPARSE_GIT_COMMIT": "c0ffee1"}
    return subprocess.run([sys.executable, "-m", "experiments.bench.kernels", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_cpu_run_is_a_correctness_sweep_and_smoke_covers_the_timing_path(tmp_path):
    out = tmp_path / "k.json"
    done = _run(f"--out={out}", "--smoke", "--kernels=segment_attention,block_scores",
                "--seq_lens=64", "--kv_heads=1", "--heads=2", "--head_dim=16", "--reps=1",
                "--score_seq_len=128", "--score_heads=2,1,16", "--packed_segments=3")
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
    assert score["kernel_config"] == {"block_size": 64}
    # Provenance: the commit (from the environment here: no .git needed) and the settings that ran.
    assert result["git"] == "c0ffee1"
    assert result["config_source"] == "default_config" and result["config"] == result["default_config"]
    attention = {r["impl"]: r for r in result["rows"] if "what" not in r and "error" not in r}
    for impl in ("pallas", "pallas_packed3"):
        assert attention[impl]["kernel_config"] == result["config"], impl
    assert "kernel_config" not in attention["library"]
    # FLOPs: only the (query, key) pairs the mask keeps; 3 packed documents in 64 tokens have about
    # a third of one causal document's. 4·H·D per pair forward, 3.5x that with the backward.
    for impl, docs in (("pallas", [64]), ("library", [64]), ("pallas_packed3", [22, 21, 21])):
        row, pairs = attention[impl], _mask_pairs(docs)
        assert row["visible_pairs"] == pairs and row["segments"] == len(docs), impl
        fwd_flops = 4 * pairs * 2 * 16
        assert row["fwd_tflops"] == pytest.approx(fwd_flops / (row["fwd_ms"] / 1e3) / 1e12, rel=1e-9)
        assert row["fwd_bwd_tflops"] == pytest.approx(
            3.5 * fwd_flops / (row["fwd_bwd_ms"] / 1e3) / 1e12, rel=1e-9)
    assert attention["pallas_packed3"]["visible_pairs"] < 0.4 * attention["pallas"]["visible_pairs"]


def _mask_pairs(doc_lengths: list[int]) -> int:
    """Visible (query, key) pairs of causal attention over packed documents, by the mask rule."""
    seg = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
    pos = np.concatenate([np.arange(n) for n in doc_lengths])
    mask = visible(pos[:, None], pos[None, :], seg[:, None], seg[None, :], causal=True)
    return int(np.asarray(mask).sum())


def test_bad_flags_fail_before_running(tmp_path):
    done = _run(f"--out={tmp_path / 'k.json'}", "--seq_lens=abc", timeout=120)
    assert done.returncode != 0 and "seq_lens" in done.stderr
    done = _run(f"--out={tmp_path / 'k.json'}", "--kernels=flash", timeout=120)
    assert done.returncode != 0 and "kernels" in done.stderr
    done = _run(f"--out={tmp_path / 'k.json'}", "--baselines=flash", timeout=120)
    assert done.returncode != 0 and "baselines" in done.stderr
    assert not (tmp_path / "k.json").exists()
