"""The benchmark figures: each drawn from a JSON result, from the committed results too, and skipped
cleanly without matplotlib or without data to draw."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from experiments import bench, plots

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("matplotlib")  # the optional "plots" extra


def _result(benchmark, rows, summary=None, **extra):
    return {"benchmark": benchmark, "device": "cpu", "git": "abc", **extra, "rows": rows,
            "summary": summary or {}}


def _is_png(path: pathlib.Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_every_figure_is_drawn_from_its_json(tmp_path):
    memory = [{"preset": "tiny", "seq_len": t, "method": m, "remat": r, "temp_bytes": t * k,
               "arg_bytes": 10**6} for t in (1024, 2048) for r in ("none", "full")
              for m, k in (("lora", 2000), ("lemo", 1000))]
    speed = [{"preset": "subllm-tiny", "model": m, "seq_len": t, "batch_size": 1, "dtype": "float32",
              "train_tokens_per_s": t / s, "decode_token_s": 0.01 * s} for t in (256, 512)
             for m, s in (("dense", 1.5), ("subllm", 1.0))]
    history = {"step": [10, 20, 30], "loss": [7.0, 6.5, 6.2]}
    quality = [{"method": "base", "mlp_drop": None}, {"method": "lora", "mlp_drop": None,
                                                       "loss_history": history},
               {"method": "lemo", "mlp_drop": 0.8, "selector": "oracle", "loss_history": history}]
    predictor = [{"kind": "layer", "layer": i, "recall@0.4": 0.5, "spearman": 0.3, "sparse": i > 0}
                 for i in range(3)] + [{"kind": "timing", "variant": "fixed", "step_s": 1.0}]
    sparsity = [{"seq_len": 128, "layer": i, "block_min_over_max": 0.5, "score_sparsity": 0.4,
                 "score_sparsity_nosink": 0.3, "softmax_sparsity": 0.9, "cross_input_jaccard": 0.3,
                 "adjacent_layer_jaccard": None if i == 2 else 0.5, "keep_blocks": [[0], [1]]}
                for i in range(3)]
    cases = {
        "lemo_memory": _result("lemo_memory", memory),
        "subllm_speed": _result("subllm_speed", speed, {"train_throughput_ratio@256": 1.5}),
        "lemo_quality": _result("lemo_quality", quality, settings={"seq_len": 256}),
        "subllm_quality": _result("subllm_quality", [{"model": "dense", "loss_history": history}],
                                  settings={"seq_len": 64, "batch_size": 2}),
        "lemo_predictor": _result("lemo_predictor", predictor, settings={"seq_len": 256}),
        "analyze_sparsity": _result("analyze_sparsity", sparsity, settings={"block_size": 64}),
        "lemo_selection": _result("lemo_selection", [
            {"kind": "dense", "seq_len": 128, "loss_shakespeare": 3.0, "loss_english": 2.0},
            *({"kind": "loss", "rule": rule, "seq_len": 128, "keep": k, "loss_shakespeare": 3 + k,
               "loss_english": 2 + k} for rule in ("oracle", "random") for k in (0.4, 0.7))],
            settings={"model": "tiny"}),
        "lemo_scale": _result("lemo_scale", [
            {"preset": "tiny", "seq_len": t, "remat": "full", "method": m, "flops_ratio": k,
             "activation_ratio": k, "total_ratio": k, "flops": 10 / k,
             "flops_by_category": {"attention": 6 / k, "mlp": 4 / k}}
            for t in (1024, 2048) for m, k in (("lora", 1.0), ("lemo_elimination", 1.3))],
            {"analytic_ceiling@1024": 1.4}, settings={"goal_row": {
                "preset": "tiny", "method": "lemo_elimination", "remat": "full"}}),
    }
    assert set(cases) == set(plots.FIGURES)
    for name, result in cases.items():
        png = tmp_path / f"{name}.png"
        assert plots.plot(result, png) == f"wrote {png}"
        assert _is_png(png), name


def test_nothing_to_draw_and_unknown_benchmarks_are_skipped(tmp_path):
    no_history = _result("lemo_quality", [{"method": "lora", "train_loss": 5.0}])
    assert plots.plot(no_history, tmp_path / "q.png").startswith("skipped")
    assert plots.plot(_result("lemo_speed", []), tmp_path / "s.png").startswith("no figure")
    assert not list(tmp_path.iterdir())


def test_the_committed_results_redraw_without_rerunning(tmp_path):
    for f in (ROOT / "bench_results").glob("*.json"):
        shutil.copy(f, tmp_path)
    done = subprocess.run([sys.executable, "-m", "experiments.plots", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("lemo_memory", "subllm_speed", "lemo_predictor", "analyze_sparsity"):
        assert f"wrote {tmp_path / name}.png" in done.stdout
        assert _is_png(tmp_path / f"{name}.png")


def test_write_result_draws_the_figure_or_says_why_not(tmp_path, monkeypatch, capsys):
    rows = [{"preset": "tiny", "seq_len": 128, "method": m, "remat": "none", "temp_bytes": 1000,
             "arg_bytes": 10} for m in ("lora", "lemo")]
    bench.write_result(tmp_path / "m.json", "lemo_memory", rows, {})
    assert _is_png(tmp_path / "m.png") and "wrote" in capsys.readouterr().out
    monkeypatch.setattr(plots, "_pyplot", lambda: None)  # as without matplotlib
    bench.write_result(tmp_path / "n.json", "lemo_memory", rows, {})
    out = capsys.readouterr().out
    assert "skipped" in out and "matplotlib is not installed" in out and len(out.splitlines()) == 1
    assert json.loads((tmp_path / "n.json").read_text())["rows"] == rows
    assert not (tmp_path / "n.png").exists()


def test_loss_history_reads_metrics_jsonl_keeping_the_last_value_per_step(tmp_path):
    assert bench.loss_history(tmp_path) is None
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4},
             {"step": 3, "prune_tau": 0.1}, {"step": 4, "loss": 2.0, "grad_norm": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert bench.loss_history(tmp_path) == {"step": [1, 2, 4], "loss": [3.0, 2.4, 2.0]}


def test_a_training_run_draws_its_curves(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": s, "loss": 7.0 - s / 10, "grad_norm": 1.0, "lr": 1e-3 * min(s / 10, 1),
                **({"tokens_per_s": 1000.0 + s} if s > 5 else {"compile_s": 2.5}),
                **({"val_loss": 6.9 - s / 10} if s % 20 == 0 else {})} for s in range(5, 45, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                       + '{"step": 45, "lo')  # a line cut by a kill
    (run / "summary.json").write_text("{}")  # a run's JSON files are not benchmark results
    plots.main(["plots", str(run)])
    assert f"wrote {run / 'curves.png'}" in capsys.readouterr().out
    assert _is_png(run / "curves.png")
    assert [r["step"] for r in plots.read_run(run)] == list(range(5, 45, 5))
    (run / "metrics.jsonl").write_text("")
    assert "has no records" in plots.plot_run(run)
