"""The sharded compile-only memory benchmark end to end on the tiny preset and 8 simulated devices."""

import json
import pathlib
import subprocess
import sys

import pytest
from _env import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

MEMORY_KEYS = ("temp_bytes", "arg_bytes", "output_bytes", "total_bytes", "param_bytes_unsharded")


def test_sharded_memory_smoke(tmp_path):
    out = tmp_path / "sharded.json"
    # The module sets its own XLA flags (8 host devices) before importing jax: start it without ours.
    env = subprocess_env()
    # LeMo on the seq8 mesh selects 64-token blocks per shard: 1024 = 2 x 64 x 8 (at 512, one block
    # per shard, LeMo's selection costs more than it saves there). One process for speed
    # (--noisolate); the real run compiles each configuration in its own. Six layers (`small`): with
    # `tiny`'s two, LeMo's one sparse layer saves less than the scanned LoRA baseline's loop does.
    done = subprocess.run([sys.executable, "-m", "experiments.bench.sharded_memory", "--preset=small",
                           "--seq_len=1024", "--remat=none", "--noisolate", f"--out={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result) >= {"benchmark", "backend", "device", "jax", "git", "settings", "rows", "summary"}
    assert result["benchmark"] == "sharded_memory"
    rows = {(r["mesh_name"], r["method"]): r for r in result["rows"]}
    assert list(rows) == [("single", "lora"), ("single", "lemo"), ("fsdp8", "lora"),
                          ("fsdp8", "lemo"), ("seq8", "lora"), ("seq8", "lemo")]
    for row in rows.values():
        assert "error" not in row, row
        assert all(isinstance(row[k], int) and row[k] > 0 for k in MEMORY_KEYS), row
        assert row["total_bytes"] == row["temp_bytes"] + row["arg_bytes"] + row["output_bytes"]
        assert row["compile_s"] > 0 and row["seq_len"] == 1024 and row["remat"] == "none"
    assert rows["fsdp8", "lora"]["mesh"] == "1,8,1,1" and rows["seq8", "lora"]["mesh"] == "1,1,1,8"
    # Per-device bytes: FSDP splits the parameters 8 ways; the seq mesh replicates them.
    for method in ("lora", "lemo"):
        params = rows["fsdp8", method]["param_bytes_unsharded"]
        assert rows["fsdp8", method]["arg_bytes"] < params / 4
        assert rows["seq8", method]["arg_bytes"] >= params
        assert rows["fsdp8", method]["collectives"]["all-gather"]["count"] > 0
        # What FSDP adds to one device's temp (tests/test_fsdp_weights.py bounds it).
        over = result["summary"][f"temp_over_single_gib_{method}@fsdp8"]
        assert over == pytest.approx((rows["fsdp8", method]["temp_bytes"]
                                      - rows["single", method]["temp_bytes"]) / 2**30)
    for mesh in ("fsdp8", "seq8"):
        lora_row, lemo_row = rows[mesh, "lora"], rows[mesh, "lemo"]
        assert lemo_row["temp_bytes"] <= lora_row["temp_bytes"]
        ratio = result["summary"][f"activation_ratio@{mesh}"]
        assert ratio == pytest.approx(lora_row["temp_bytes"] / lemo_row["temp_bytes"])
        assert result["summary"][f"total_ratio@{mesh}"] == pytest.approx(
            lora_row["total_bytes"] / lemo_row["total_bytes"])
    assert set(result["summary"]) == {f"{k}@{m}" for k in ("activation_ratio", "total_ratio")
                                      for m in ("single", "fsdp8", "seq8")} | {
        f"temp_over_single_gib_{m}@fsdp8" for m in ("lora", "lemo")}
    assert "fsdp8" in done.stdout and "seq8" in done.stdout
