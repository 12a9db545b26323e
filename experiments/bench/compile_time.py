"""Compile time and compiled memory of a LoRA / LeMo training step, scanned vs unrolled layers.

    python -m experiments.bench.compile_time [--preset=llama2-7b --seq_lens=8192 --reps=3]

The step (``jax.grad`` of the loss over the LoRA weights, bf16, remat ``none``, chunked attention,
2048-token loss segments, LeMo's default schedule grouped to its runs) is lowered on abstract
parameters and compiled; nothing is allocated, so 7B shapes work on a CPU. Each row is one
(method, layers) pair: ``scan`` runs each run of identical layers under one ``lax.scan``,
``unrolled`` the same per-layer function in a Python loop (``Llama(scan_layers=False)``). Times are
the median of ``--reps`` fresh lower+compile calls, the two layouts interleaved in one process.
"""

from __future__ import annotations

import statistics
import time

from absl import flags

from experiments import _checks
from experiments.bench import write_result
from experiments.bench.inputs import lowered_lora_step
from tokensparse.config import LeMoConfig, preset, preset_names

_PRESET = flags.DEFINE_string("preset", "llama2-7b", "Model preset (random weights, shapes only).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192"], "Sequence lengths.")
_METHODS = flags.DEFINE_list("methods", ["lora", "lemo"], "Training steps to compile.")
_LAYOUTS = flags.DEFINE_list("layouts", ["scan", "unrolled"], "Layer loop layouts.")
_REPS = flags.DEFINE_integer("reps", 3, "Fresh compiles per row (the median is reported).")
_OUT = flags.DEFINE_string("out", "bench_results/compile_time.json", "Where to write the JSON.")

_checks.one_of(_PRESET, preset_names())
_checks.one_of(_METHODS, ("lora", "lemo"))
_checks.one_of(_LAYOUTS, ("scan", "unrolled"))
_checks.int_list(_SEQ_LENS, multiple_of=LeMoConfig().block_size, why="LeMo keeps whole blocks")


def measure(config, seq_len: int, method: str, scan: bool) -> dict:
    start = time.perf_counter()
    lowered = lowered_lora_step(config, seq_len, method, lemo=LeMoConfig(), scan_layers=scan)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    mem = compiled.memory_analysis()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start,
            "temp_bytes": int(mem.temp_size_in_bytes), "arg_bytes": int(mem.argument_size_in_bytes),
            "hlo_chars": len(compiled.as_text())}


def main(argv):
    del argv
    config = preset(_PRESET.value, dtype="bfloat16", param_dtype="bfloat16")
    rows, summary = [], {}
    for seq_len in map(int, _SEQ_LENS.value):
        for method in _METHODS.value:
            runs = {layout: [] for layout in _LAYOUTS.value}
            for _ in range(_REPS.value):
                for layout in _LAYOUTS.value:  # interleaved: load drifts hit both layouts
                    runs[layout].append(measure(config, seq_len, method, layout == "scan"))
            for layout, reps in runs.items():
                row = {"preset": _PRESET.value, "seq_len": seq_len, "method": method,
                       "layers": layout, "reps": len(reps),
                       **{k: statistics.median(r[k] for r in reps) for k in reps[0]}}
                rows.append(row)
                print(f"{seq_len:>6} {method:>5} {layout:>8} total {row['total_s']:6.1f} s  "
                      f"temp {row['temp_bytes'] / 2**30:6.2f} GiB", flush=True)
            if {"scan", "unrolled"} <= set(runs):
                by = {r["layers"]: r for r in rows[-2:]}
                summary[f"{method}_compile_speedup@{seq_len}"] = (by["unrolled"]["total_s"]
                                                                  / by["scan"]["total_s"])
    write_result(_OUT.value, "compile_time", rows, summary, png=False,
                 settings={"dtype": "bfloat16", "remat": "none", "attention": "chunked",
                           "loss_segment": 2048, "batch": 1,
                           "lemo": "default schedule (keep 0.4 in layers L/2-1..L-2), grouped"})


if __name__ == "__main__":
    _checks.run(main)
