"""The scale benchmark: its max-length search (fast) and a tiny end-to-end run (slow) whose FLOPs
categories agree with the analytic count."""

import json
import math
import pathlib
import subprocess
import sys

import pytest
from _env import subprocess_env

from experiments.bench.scaling import STEP, analytic_flops, fitted_max, verify_max
from tokensparse.config import LeMoConfig, preset
from tokensparse.flops import CATEGORIES
from tokensparse.lemo.comparison import ROWS

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_fitted_max_solves_the_quadratic_on_multiples_of_the_step():
    a, b, c, budget = 5e9, 3e5, 2.0, 80e9
    lengths = [8192, 16384, 32768, 65536]
    values = [a + b * t + c * t * t for t in lengths]
    root = (-b + math.sqrt(b * b - 4 * c * (a - budget))) / (2 * c)
    assert fitted_max(lengths, values, budget) == math.floor(root / STEP) * STEP
    # a line through two points, and nothing fits
    assert fitted_max([4096, 8192], [1.0, 2.0], 3.0) == 3 * STEP
    assert fitted_max([4096, 8192], [10.0, 20.0], 5.0) == 0


def _limit(n):
    calls = []

    def fits(t):
        calls.append(t)
        return t <= n
    return fits, calls


@pytest.mark.parametrize("guess", [4096, 8192, 16384, 28672])
def test_verify_max_walks_to_the_last_fitting_length(guess):
    fits, calls = _limit(18000)
    assert verify_max(fits, guess) == (16384, True)
    assert 16384 in calls and 20480 in calls and all(t % STEP == 0 for t in calls)
    assert len(calls) == len(set(calls))  # each length compiled once


def test_verify_max_reports_nothing_fits_and_an_unconfirmed_walk():
    assert verify_max(_limit(100)[0], 8192) == (0, True)
    length, confirmed = verify_max(_limit(10**9)[0], 8192, max_steps=2)
    assert not confirmed and length > 8192


def test_analytic_ceiling_counts_a_sparse_layer_as_fewer_tokens_and_rho_squared_attention():
    cfg = preset("llama2-7b")
    t, keep = 32768, LeMoConfig().keep_ratios(cfg.n_layers)
    dense = analytic_flops(cfg, t, (1.0,) * cfg.n_layers, "full", causal=False)
    sparse = analytic_flops(cfg, t, keep, "full", causal=False)
    n_sparse = sum(r < 1 for r in keep)
    kept = math.floor(0.4 * t / 64) * 64
    assert sparse["mlp"] == dense["mlp"] and sparse["head"] == dense["head"]
    assert sparse["attention"] == pytest.approx(
        dense["attention"] * (1 - n_sparse / cfg.n_layers * (1 - (kept / t) ** 2)))
    assert sum(dense.values()) / sum(sparse.values()) > sum(
        analytic_flops(cfg, t, (1.0,) * cfg.n_layers, "full", causal=True).values()) / sum(
        analytic_flops(cfg, t, keep, "full", causal=True).values()) > 1.0
    with pytest.raises(ValueError, match="remat"):
        analytic_flops(cfg, t, keep, "dots", causal=True)


@pytest.mark.slow
def test_tiny_run_writes_every_row_and_key(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [sys.executable, "-m", "experiments.bench.lemo_scale", f"--out={out}", "--preset=tiny",
         "--seq_lens=256,512", "--remat=full", "--config.lemo.mlp_mode=dense",
         "--config.lemo.eliminated=pass",  # what the hand count below models
         "--budget_gib=0.15", "--fsdp_chip_gib=0.01"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "lemo_scale" and out.with_suffix(".png").exists()
    rows = result["rows"]
    assert [(r["seq_len"], r["method"]) for r in rows] == [(t, m) for t in (256, 512) for m in ROWS]
    cfg = preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    keep = LeMoConfig().keep_ratios(cfg.n_layers)
    for row in rows:
        assert set(row["flops_by_category"]) == set(CATEGORIES)
        assert row["flops"] == pytest.approx(sum(row["flops_by_category"].values()))
        assert row["flops_causal"] < row["flops"]
        assert row["total_bytes"] == row["temp_bytes"] + row["arg_bytes"]
        # With a dense MLP LeMo's MLP treatment is the baseline's: rows coincide, compiled once.
        assert row.get("same_as") == {"lemo_mlp": "lora", "lemo": "lemo_elimination"}.get(row["method"])
        hand = analytic_flops(cfg, row["seq_len"], keep if "elimination" in row["method"]
                              or row["method"] == "lemo" else (1.0,) * cfg.n_layers, "full",
                              causal=False)
        for category in ("attention", "mlp", "head"):
            assert row["flops_by_category"][category] == pytest.approx(hand[category]), category
    summary = result["summary"]
    for t in (256, 512):
        for key in ("flops_ratio", "flops_ratio_causal", "activation_ratio", "total_ratio",
                    "selection_share", "flops_ratio_free_selection", "analytic_ceiling",
                    "analytic_ceiling_causal"):
            assert math.isfinite(summary[f"{key}@{t}"]), key
        assert summary[f"flops_ratio_free_selection@{t}"] > summary[f"flops_ratio@{t}"]
        assert 0 < summary[f"selection_share@{t}"] < 1
    for method in ROWS:
        assert summary[f"max_seq_len_80gib_{method}"] % STEP == 0
        assert summary[f"max_seq_len_16gib_fsdp8_estimated_{method}"] % STEP == 0
    assert all("verified" in d for d in result["max_seq_len"])
    assert "ESTIMATED" in result["settings"]["fsdp"]
