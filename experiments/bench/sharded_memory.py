"""Dense LoRA vs LeMo on a device mesh: compile-only per-device memory of one LoRA training step.

    python -m experiments.bench.sharded_memory [--preset=llama2-7b --seq_len=32768 \
        --meshes="1,1,1,1;1,8,1,1;1,1,1,8" --remat=none,full --out FILE]

What one device of a mesh (axes data, fsdp, tensor, seq) needs for the LoRA gradient of a long
sequence, with and without LeMo. As in ``lemo_memory`` nothing is allocated: abstract parameters are
placed by the logical-axis rules (``sharding.state_shardings``), the batch by
``sharding.batch_sharding``, and ``jax.grad`` of the loss is lowered and compiled under
``jax.set_mesh``. The compiled program is XLA's per-device partition, so ``memory_analysis()`` gives
per-device bytes: ``temp_bytes`` (activations + workspace), ``arg_bytes`` (this device's shard of the
weights, LoRA and batch), ``output_bytes`` (LoRA gradients) and ``total_bytes``, their sum. Each
configuration compiles in its own process (``--isolate``), so a failure or a compile past
``--timeout`` becomes an ``error`` row instead of a hang. Rows also carry compile time and the
collectives of the compiled HLO (count, largest result): that is where an unintended gather shows,
e.g. an ``all-gather`` whose result is a whole [B, T, D] activation.

The default meshes:

- ``1,1,1,1`` (single): one device and no mesh at all, the reference the others are read against.
- ``1,8,1,1`` (fsdp8): weights split 8 ways (arguments about 1/8 of one device's). A batch of 1 has
  no rows to split, so every device holds the whole sequence's activations: temp is at best one
  device's, and what it has over that is what FSDP costs in memory: the weights gathered at a
  time (ZeRO-3 gathers each layer's weights for its forward and again for its backward, and keeps
  only the shards in between, ``llama.with_gathered``), the gathered LM head, collective buffers.
  The summary's ``temp_over_single_gib_<method>@fsdp8`` is that excess. Larger batches
  (``--batch=8``) split the activations too.
- ``1,1,1,8`` (seq8): weights replicated, the sequence in 8 contiguous pieces. LeMo picks its
  blocks per piece (``LeMoConfig.route_shards`` follows the mesh); K and V are gathered for attention.

Settings, the same for both methods on a mesh (BENCHMARKS.md): bf16, LoRA rank 8 on q, k, v, o,
``LeMoConfig(selector="oracle")`` (the rule its published numbers used), batch 1, remat ``none`` and
``full``, and:

- Attention ``chunked``, as in ``lemo_memory``: no [T, T] tensors, like a flash kernel on a GPU.
  On a seq split it attends each shard's own queries to the gathered keys (before git 7888988 the
  queries were gathered too). Without remat each layer keeps its gathered, full-length K and V for
  the backward (at llama2-7b / 32K: 2 x 256 MiB per layer, 16 GiB per device), which is why seq8
  divides temp by about 3, not 8; ``full`` remat removes them.
- ``loss_segment`` 2048 without a seq axis, as in ``lemo_memory`` (no [T, V] logits). With a seq
  axis it is 0, i.e. no segments. The segmented loss maps over segments of the sequence, so on a
  split sequence XLA gathers the whole [B, T, D] hidden state and every device applies the LM head
  to all T tokens. Unsegmented, each device computes only its own [T/S, V] logits (32K / 8: two
  2048-row segments' worth). ``--loss_segment`` overrides.

On a CPU, XLA computes bf16 matmuls in f32, so some temporaries and collectives are f32 where a GPU
or TPU keeps bf16: read absolute numbers as upper bounds and compare ratios. The ratio is
LoRA / LeMo (larger is better).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

# Set before jax is imported (hence the E402 waivers below): 8 simulated CPU devices, so the meshes
# exist on a CPU-only machine, and, as for every benchmark, the XLA CPU scheduler that lets remat
# show. Flags the caller already gave win.
_FLAGS = os.environ.get("XLA_FLAGS", "")
for _flag, _value in (("--xla_force_host_platform_device_count", "8"),
                      ("--xla_cpu_enable_concurrency_optimized_scheduler", "false")):
    if _flag not in _FLAGS:
        _FLAGS = f"{_FLAGS} {_flag}={_value}".strip()
os.environ["XLA_FLAGS"] = _FLAGS

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import flags  # noqa: E402

from experiments import _checks  # noqa: E402
from experiments.bench import write_result  # noqa: E402
from experiments.bench.inputs import AbstractBatch, lora_step  # noqa: E402
from tokensparse import attention, sharding  # noqa: E402
from tokensparse.config import MESH_AXES, LeMoConfig, MeshConfig, preset, preset_names  # noqa: E402
from tokensparse.remat import REMAT_POLICIES  # noqa: E402

_PRESET = flags.DEFINE_string("preset", "llama2-7b", "Model preset (random weights, shapes only).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 32768, "Sequence length (LeMo: a multiple of 64 x seq axis).")
_BATCH = flags.DEFINE_integer("batch", 1, "Global batch size (sequences per step).")
_MESHES = flags.DEFINE_string("meshes", "1,1,1,1;1,8,1,1;1,1,1,8", "';'-separated mesh shapes "
                              "data,fsdp,tensor,seq (1,1,1,1: one device, no mesh).")
_REMAT = flags.DEFINE_list("remat", ["none", "full"], "Remat policies (each for both methods on every "
                           "mesh); the summary's unsuffixed keys are for 'none'.")
_ATTENTION = flags.DEFINE_string("attention", "chunked", "Attention backend for both methods.")
_LOSS_SEGMENT = flags.DEFINE_integer("loss_segment", -1, "Positions per LM-head chunk; 0: no "
                                     "chunking; -1: 2048 without a seq axis, 0 with one (see above).")
_TIMEOUT = flags.DEFINE_integer("timeout", 600, "Seconds one configuration may take to compile; a "
                                "slower one is recorded as failed.")
_ISOLATE = flags.DEFINE_bool("isolate", True, "Compile each configuration in its own process, so a "
                             "crash or a compile past --timeout becomes an error row (--noisolate: "
                             "one process, faster for small presets).")
_JOBS = flags.DEFINE_integer("jobs", 1, "Configurations compiled at once (one process each).")
_HLO_DIR = flags.DEFINE_string("hlo_dir", "", "If set, write each compiled program's HLO text here.")
_ONE = flags.DEFINE_string("one", "", "Internal: measure one 'mesh|method|remat', print its row.")
_OUT = flags.DEFINE_string("out", "bench_results/sharded_memory.json", "Where to write the JSON.")

_checks.one_of(_PRESET, preset_names())
_checks.at_least(_SEQ_LEN, 1)
_checks.at_least(_BATCH, 1)
_checks.one_of(_REMAT, REMAT_POLICIES)
_checks.one_of(_ATTENTION, _checks.attention_backends())
_checks.at_least(_LOSS_SEGMENT, -1)
_checks.at_least(_TIMEOUT, 1)
_checks.at_least(_JOBS, 1)

METHODS = ("lora", "lemo")
_ROW_MARK = "ROW "


LEMO = LeMoConfig(selector="oracle", keep_first_block=False)  # the published rows' selection

def parse_mesh(text: str) -> MeshConfig:
    sizes = [int(s) for s in text.split(",")]
    if len(sizes) != 4:
        raise ValueError(f"mesh {text!r} must have 4 sizes: data,fsdp,tensor,seq.")
    return MeshConfig(*sizes)


@flags.validator("meshes")
def _meshes_parse(text: str) -> bool:
    for mesh in filter(str.strip, text.split(";")):
        try:
            parse_mesh(mesh)
        except (ValueError, TypeError) as e:
            raise flags.ValidationError(str(e)) from None
    return True


def mesh_label(mesh: MeshConfig) -> str:
    """``fsdp8``, ``seq8``, ``fsdp2_seq4``; ``single`` for one device (the summary's key suffix)."""
    parts = [f"{name}{size}" for name, size in zip(MESH_AXES, mesh.sizes(), strict=True) if size > 1]
    return "_".join(parts) or "single"


def loss_segment_for(mesh: MeshConfig) -> int:
    if _LOSS_SEGMENT.value >= 0:
        return _LOSS_SEGMENT.value
    return 0 if mesh.seq > 1 else 2048


def _abstract(state, mesh):
    """Shape-only variables carrying their rule shardings (what ``sharding.shard`` would place)."""
    def place(spec, variable):
        x = variable.get_value()
        return variable.replace(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=spec))

    return jax.tree.map(place, sharding.state_shardings(state, mesh), state)


_COLLECTIVE = re.compile(r"= ([^=]*?) (all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64)\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4,
          "f32": 4, "s64": 8, "u64": 8, "f64": 8}


def collectives(hlo: str) -> dict:
    """Per collective kind in the compiled (per-device) HLO: how many, and the largest result."""
    found: dict = {}
    for match in _COLLECTIVE.finditer(hlo):
        result, kind = match.groups()
        arrays = _ARRAY.findall(result)
        size = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in arrays)
        entry = found.setdefault(kind, {"count": 0, "largest_bytes": 0, "largest": ""})
        entry["count"] += 1
        if size > entry["largest_bytes"]:
            entry["largest_bytes"], entry["largest"] = size, " ".join(f"{t}[{d}]" for t, d in arrays)
    return found


def step_cost(config, mesh_config: MeshConfig, method: str, remat: str) -> dict:
    """Lower and compile one LoRA gradient step on the mesh; XLA's per-device buffer sizes."""
    seq_len, batch, segment = _SEQ_LEN.value, _BATCH.value, loss_segment_for(mesh_config)
    n = math.prod(mesh_config.sizes())
    devices = jax.devices() if len(jax.devices()) >= n else jax.devices("cpu")
    # One device runs without a mesh, as every single-device benchmark does.
    mesh = sharding.make_mesh(mesh_config, devices[:n]) if n > 1 else None
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        loss, lora_state, rest = lora_step(config, seq_len, method, lemo=LEMO, remat=remat,
                                           attention=_ATTENTION.value, loss_segment=segment)
        placed = mesh is not None
        ints = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=sharding.batch_sharding(
            (batch, seq_len), mesh) if placed else None)
        args = (_abstract(lora_state, mesh) if placed else lora_state,
                _abstract(rest, mesh) if placed else rest, AbstractBatch(ints, ints, ints))
        start = time.perf_counter()
        lowered = jax.jit(jax.grad(loss)).lower(*args)
        lower_s = time.perf_counter() - start
        compiled = lowered.compile()
        compile_s = time.perf_counter() - start - lower_s
    mem = compiled.memory_analysis()
    hlo = compiled.as_text()
    if _HLO_DIR.value:
        path = pathlib.Path(_HLO_DIR.value) / f"{mesh_label(mesh_config)}_{method}_{remat}.hlo"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(hlo)
    temp, arg, out = (int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes),
                      int(mem.output_size_in_bytes))
    params = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves((lora_state, rest)))
    return {**_row_key(mesh_config, method, remat), "platform": devices[0].platform,
            "temp_bytes": temp, "arg_bytes": arg, "output_bytes": out, "total_bytes": temp + arg + out,
            "param_bytes_unsharded": int(params), "lower_s": round(lower_s, 2),
            "compile_s": round(compile_s, 2), "collectives": collectives(hlo)}


def _row_key(mesh: MeshConfig, method: str, remat: str) -> dict:
    return {"preset": _PRESET.value, "seq_len": _SEQ_LEN.value, "batch": _BATCH.value,
            "mesh": ",".join(map(str, mesh.sizes())), "mesh_name": mesh_label(mesh), "method": method,
            "remat": remat, "attention": _attention_ran(), "loss_segment": loss_segment_for(mesh)}


def _attention_ran() -> str:
    """The attention backend the step runs: ``--attention`` resolved for the preset's shapes."""
    config = preset(_PRESET.value, dtype="bfloat16", param_dtype="bfloat16")
    return attention.model_backend(_ATTENTION.value, config, seq_len=_SEQ_LEN.value,
                                   batch=_BATCH.value)


def measure_in_subprocess(mesh: MeshConfig, method: str, remat: str) -> dict:
    """One configuration in a child process, so a compile that runs past ``--timeout`` (or crashes)
    is recorded as an ``error`` row instead of hanging or ending the benchmark."""
    passed = [f"--preset={_PRESET.value}", f"--seq_len={_SEQ_LEN.value}", f"--batch={_BATCH.value}",
              f"--attention={_ATTENTION.value}", f"--loss_segment={_LOSS_SEGMENT.value}",
              f"--hlo_dir={_HLO_DIR.value}"]
    one = f"{','.join(map(str, mesh.sizes()))}|{method}|{remat}"
    cmd = [sys.executable, "-m", "experiments.bench.sharded_memory", *passed, f"--one={one}"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT.value)
    except subprocess.TimeoutExpired:
        return {**_row_key(mesh, method, remat),
                "error": f"not compiled within --timeout={_TIMEOUT.value} s"}
    for line in done.stdout.splitlines():
        if line.startswith(_ROW_MARK):
            return json.loads(line[len(_ROW_MARK):])
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
    return {**_row_key(mesh, method, remat), "error": f"exit {done.returncode} after "
            f"{time.perf_counter() - start:.0f} s: " + " | ".join(tail)}


def temp_over_single(rows: list[dict]) -> dict:
    """``temp_over_single_gib_<method>[_remat_<r>]@<mesh>``: per-device temp on a mesh minus the
    same step's on one device (no mesh), in GiB, for meshes that split no activations (batch and
    sequence whole on every device), where any excess is what the mesh adds (gathered weights,
    collective buffers)."""
    single = {(r["method"], r["remat"]): r["temp_bytes"] for r in rows
              if r["mesh_name"] == "single" and "error" not in r}
    out = {}
    for row in rows:
        data, fsdp, tensor, seq = (int(x) for x in row["mesh"].split(","))
        rows_split = data * fsdp > 1 and row["batch"] % (data * fsdp) == 0
        whole = tensor == seq == 1 and not rows_split
        key = (row["method"], row["remat"])
        if row["mesh_name"] == "single" or not whole or "error" in row or key not in single:
            continue
        suffix = "" if row["remat"] == "none" else f"_remat_{row['remat']}"
        out[f"temp_over_single_gib_{row['method']}{suffix}@{row['mesh_name']}"] = \
            (row["temp_bytes"] - single[key]) / 2**30
    return out


def uncommitted_library_files() -> list[str]:
    """Library files that differ from the recorded git commit (the numbers measure the working tree)."""
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--", "tokensparse", "kernels_pallas"],
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return sorted(line[3:] for line in done.stdout.splitlines())


def _gib(x) -> str:
    return f"{x / 2**30:>9.2f}" if isinstance(x, int) else f"{'-':>9}"


def main(argv):
    del argv
    config = preset(_PRESET.value, dtype="bfloat16", param_dtype="bfloat16")
    if _ONE.value:
        mesh, method, remat = _ONE.value.split("|")
        print(_ROW_MARK + json.dumps(step_cost(config, parse_mesh(mesh), method, remat)), flush=True)
        return
    meshes = [parse_mesh(m) for m in _MESHES.value.split(";") if m.strip()]
    configs = [(remat, mesh, method) for remat in _REMAT.value for mesh in meshes for method in METHODS]
    with concurrent.futures.ThreadPoolExecutor(max(1, _JOBS.value)) as pool:
        measure = measure_in_subprocess if _ISOLATE.value else functools.partial(step_cost, config)
        rows = list(pool.map(lambda c: measure(c[1], c[2], c[0]), configs))
    print("per device:\n"
          f"{'mesh':>8} {'remat':>6} {'method':>6} {'temp GiB':>9} {'args GiB':>9} {'out GiB':>9} "
          f"{'total GiB':>9} {'compile s':>9}")
    for row in rows:
        print(f"{row['mesh_name']:>8} {row['remat']:>6} {row['method']:>6} "
              f"{_gib(row.get('temp_bytes'))} {_gib(row.get('arg_bytes'))} "
              f"{_gib(row.get('output_bytes'))} {_gib(row.get('total_bytes'))} "
              f"{row.get('compile_s', '-'):>9}" + (f"  ERROR {row['error']}" if "error" in row else ""))
    summary = {}
    for i in range(0, len(rows), len(METHODS)):
        lora_row, lemo_row = rows[i:i + 2]
        if "error" in lora_row or "error" in lemo_row:
            continue
        suffix = "" if lora_row["remat"] == "none" else f"_remat_{lora_row['remat']}"
        at = f"{suffix}@{lora_row['mesh_name']}"
        summary["activation_ratio" + at] = lora_row["temp_bytes"] / lemo_row["temp_bytes"]
        summary["total_ratio" + at] = lora_row["total_bytes"] / lemo_row["total_bytes"]
    summary.update(temp_over_single(rows))
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "sharded_memory", rows, summary, settings={
        "preset": _PRESET.value, "seq_len": _SEQ_LEN.value, "batch": _BATCH.value,
        "dtype": "bfloat16", "attention": _ATTENTION.value,
        "loss_segment": {mesh_label(m): loss_segment_for(m) for m in meshes},
        "meshes": {mesh_label(m): ",".join(map(str, m.sizes())) for m in meshes},
        "mesh_axes": ",".join(MESH_AXES), "bytes": "per device",
        "uncommitted_library_files": uncommitted_library_files(),
        "lemo": "keep 0.4 in layers L/2-1..L-2, oracle selection per sequence shard (block 0 not forced), "
                "MLP backward keeps 20% channels"})


if __name__ == "__main__":
    _checks.run(main)
