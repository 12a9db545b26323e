"""The SUBLLM speed and quality benchmarks end to end on subllm-tiny: their JSON is complete."""

import importlib.util

import pytest
from test_bench_lemo import _bench, _finite

pytestmark = pytest.mark.slow


def test_subllm_speed_smoke(tmp_path):
    result, stdout = _bench("subllm_speed", tmp_path / "s.json", "--preset=subllm-tiny", "--seq_lens=128",
                            "--reps=5", "--warmup=1", "--decode_tokens=4")
    assert [(r["model"], r["seq_len"]) for r in result["rows"]] == [("dense", 128), ("subllm", 128)]
    for row in result["rows"]:
        _finite(row, ("train_step_s", "train_tokens_per_s", "temp_bytes", "decode_token_s",
                      "kv_allocated_bytes", "kv_occupied_bytes"))
    dense, sub = result["rows"]
    assert sub["kv_occupied_bytes"] < dense["kv_occupied_bytes"]  # inner levels cache fewer tokens
    assert sub["kv_allocated_bytes"] < dense["kv_allocated_bytes"]  # infer_capacity 0.75 per level
    assert sub["cache_sizes"] == [128, 96, 72] and dense["cache_sizes"] == [128]
    assert len(sub["level_keep_rates"]) == 2 and dense["level_keep_rates"] == []
    assert all(abs(rate - 0.64) < 0.05 for rate in sub["level_keep_rates"])  # θ calibrated per level
    summary = result["summary"]
    assert set(summary) == {f"{k}@128" for k in (
        "train_throughput_ratio", "train_flops_ratio", "train_activation_ratio", "prefill_flops_ratio",
        "decode_speedup", "decode_cpu_speedup", "kv_allocated_ratio", "kv_occupied_ratio", "overflow_rate_1",
        "overflow_rate_2", "decode_keep_rate_1", "decode_keep_rate_2")}
    assert len(sub["decode_keep_rates"]) == 2 and dense["decode_keep_rates"] == []
    assert all(0.0 <= rate <= 1.0 for rate in sub["decode_keep_rates"])
    assert summary["kv_occupied_ratio@128"] == sub["kv_occupied_bytes"] / dense["kv_occupied_bytes"]
    assert summary["prefill_flops_ratio@128"] == dense["prefill_flops"] / sub["prefill_flops"]
    assert "train_throughput_ratio" in stdout


def test_subllm_quality_smoke(tmp_path):
    result, _ = _bench("subllm_quality", tmp_path / "q.json", "--preset=subllm-tiny", "--steps=2",
                       "--seq_len=64", "--batch_size=2", "--eval_batches=1", f"--workdir={tmp_path / 'runs'}")
    dense, sub = result["rows"]
    assert (dense["model"], sub["model"]) == ("dense", "subllm") and dense["train_tokens"] == 2 * 2 * 64
    summary = result["summary"]
    assert summary["val_loss_ratio"] == sub["val_loss"] / dense["val_loss"]
    assert summary["val_loss_ratio_topk"] == sub["val_topk_loss"] / dense["val_loss"]
    assert {"subllm_positive_fraction_0", "subllm_bypass_c_1"} <= set(summary)
    for row in (dense, sub):  # the loss curve: every logged step (here only the last)
        assert row["loss_history"] == {"step": [2], "loss": [row["train_loss"]]}
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "q.png").stat().st_size > 5000
    # Other SUBLLM options: a new SUBLLM run beside the first; the finished dense run is reused.
    options, stdout = _bench("subllm_quality", tmp_path / "q3.json", "--preset=subllm-tiny", "--steps=2",
                        "--seq_len=64", "--batch_size=2", "--eval_batches=1",
                        f"--workdir={tmp_path / 'runs'}", "--config.subllm.balancer_statistic=proportion",
                        "--config.subllm.bypass_init=0.9", "--config.subllm.balancer_margin=0.02",
                        "--config.subllm.balancer_start_scale=0.5", "--config.subllm.balancer_start_steps=1")
    assert f"reusing {tmp_path / 'runs' / 'dense'}" in stdout and "pretraining dense" not in stdout
    assert options["rows"][0]["val_loss"] == dense["val_loss"]  # the dense twin's run is shared
    settings = options["settings"]
    assert (settings["balancer_statistic"], settings["balancer_margin"]) == ("proportion", 0.02)
    assert (settings["balancer_start_scale"], settings["balancer_start_steps"]) == (0.5, 1)
    assert abs(options["summary"]["subllm_bypass_c_0"] - 0.9) < 0.01
    assert abs(summary["subllm_bypass_c_0"] - 0.5) < 0.01
    assert (tmp_path / "runs" / "subllm-proportion-c0.9-m0.02-s0.5x1" / "summary.json").exists()


def test_subllm_balancer_smoke(tmp_path):
    result, stdout = _bench("subllm_balancer", tmp_path / "b.json", "--steps=3", "--batch_size=2",
                            "--seq_len=32", "--every=1", "--tail=2", "--seeds=0,1",
                            "--config.subllm.bypass_init=0.9", "--config.subllm.balancer_margin=0.02",
                            "--config.subllm.balancer_start_scale=0.5",
                            "--config.subllm.balancer_start_steps=2", "--decompose")
    rows = result["rows"]
    assert [(r["seed"], r["step"]) for r in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for row in rows:
        _finite(row, ("positive_fraction_0", "mean_std_1", "rms_0", "bypass_c_1", "loss"))
        assert 0.0 <= row["positive_fraction_0"] <= 1.0
    assert abs(rows[0]["bypass_c_0"] - 0.9) < 1e-6  # recorded before the first update
    summary = result["summary"]
    for j in (0, 1):
        tail = [r[f"positive_fraction_{j}"] for r in rows if r["step"] >= 1]
        assert summary[f"positive_fraction_min_{j}"] == min(tail)
        assert summary[f"positive_fraction_max_{j}"] == max(tail)
        assert summary[f"band_{j}"] == pytest.approx([0.59, 0.69])
        assert summary[f"in_band_{j}"] == (min(tail) >= 0.59 and max(tail) <= 0.69)
        want = max(max(0.59 - v, v - 0.69, 0.0) for v in tail)
        assert summary[f"distance_from_band_{j}"] == pytest.approx(want, abs=1e-12)
        assert summary[f"in_band_{j}"] == (summary[f"distance_from_band_{j}"] == 0.0)
    assert result["settings"]["balancer_statistic"] == "proportion" and "level 2" in stdout
    assert result["settings"]["balancer_margin"] == 0.02  # the band measured stays the spec's
    settings = result["settings"]
    assert (settings["balancer_start_scale"], settings["balancer_start_steps"]) == (0.5, 2)
    # --decompose: the first record has nothing to compare with; the warm-up's step 0 has lr 0, so
    # the weight put back at step 1 is the weight itself; step 1 moved it, so at step 2 the swap
    # changes the scores. Level 2's statistics also move with its input (level 1's routing).
    first, second, third = rows[:3]
    assert "probe_positive_fraction_0" in first and "probe_old_w_mean_std_0" not in first
    for j in (0, 1):
        assert second[f"scorer_w_change_{j}"] == 0.0
        assert second[f"probe_old_w_mean_std_{j}"] == second[f"probe_mean_std_{j}"]
        assert third[f"scorer_w_change_{j}"] > 0.0
        assert third[f"probe_old_w_mean_std_{j}"] != third[f"probe_mean_std_{j}"]
        assert third[f"scorer_w_norm_{j}"] > 0.0
    assert rows[0]["positive_fraction_0"] != rows[3]["positive_fraction_0"]  # the seed is used
