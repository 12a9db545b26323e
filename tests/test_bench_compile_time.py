"""``experiments.bench.compile_time``: both layouts compile the same step (same memory on a tiny
model), and the summary is their time ratio."""

import json
import pathlib
import subprocess
import sys

from _env import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_compile_time_smoke(tmp_path):
    out = tmp_path / "ct.json"
    done = subprocess.run([sys.executable, "-m", "experiments.bench.compile_time", "--preset=small",
                           "--seq_lens=128", "--reps=1", f"--out={out}"], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["method"], r["layers"]): r for r in result["rows"]}
    assert set(rows) == {(m, la) for m in ("lora", "lemo") for la in ("scan", "unrolled")}
    for method in ("lora", "lemo"):
        scan, unrolled = rows[method, "scan"], rows[method, "unrolled"]
        assert scan["hlo_chars"] < unrolled["hlo_chars"]  # one body per run of layers, not six
        assert result["summary"][f"{method}_compile_speedup@128"] == (unrolled["total_s"]
                                                                    / scan["total_s"])
    assert rows["lemo", "scan"]["temp_bytes"] < rows["lora", "scan"]["temp_bytes"]
