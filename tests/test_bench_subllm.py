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
    assert sub["kv_allocated_bytes"] == dense["kv_allocated_bytes"]  # infer_capacity 1.0
    assert len(sub["level_keep_rates"]) == 2 and dense["level_keep_rates"] == []
    summary = result["summary"]
    assert set(summary) == {f"{k}@128" for k in ("train_throughput_ratio", "train_flops_ratio",
                                                  "decode_speedup", "kv_cache_ratio")}
    assert summary["kv_cache_ratio@128"] == sub["kv_occupied_bytes"] / dense["kv_occupied_bytes"]
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
    again, _ = _bench("subllm_quality", tmp_path / "q2.json", "--preset=subllm-tiny", "--steps=2",
                      "--seq_len=64", "--batch_size=2", "--eval_batches=1", f"--workdir={tmp_path / 'runs'}")
    assert again["summary"] == summary  # finished runs are reused, not retrained
    options, _ = _bench("subllm_quality", tmp_path / "q3.json", "--preset=subllm-tiny", "--steps=2",
                        "--seq_len=64", "--batch_size=2", "--eval_batches=1",
                        f"--workdir={tmp_path / 'runs'}", "--balancer_statistic=proportion",
                        "--bypass_init=0.9")
    assert options["rows"][0]["val_loss"] == dense["val_loss"]  # the dense twin's run is shared
    assert options["settings"]["balancer_statistic"] == "proportion"
    assert abs(options["summary"]["subllm_bypass_c_0"] - 0.9) < 0.01
    assert abs(summary["subllm_bypass_c_0"] - 0.5) < 0.01
    assert (tmp_path / "runs" / "subllm-proportion-c0.9" / "summary.json").exists()
