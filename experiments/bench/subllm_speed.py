"""SUBLLM vs its dense twin: training throughput, prefill FLOPs, decode latency and KV-cache bytes.

    python -m experiments.bench.subllm_speed --out bench_results/subllm_speed.json \\
        [--preset=subllm-small --seq_lens=2048,4096 --batch_size=1 --reps=5 --decode_tokens=32 \\
         --infer_capacity=0.75]
    # On a GPU, the paper's model:
    python -m experiments.bench.subllm_speed --preset=subllm-1.3b --seq_lens=4096,8192

**Training**: both models are the same class built from the same preset (the twin has structure
``"T"*n``: identical backbone, no SUBLLM modules), with random weights, the same AdamW recipe
(:func:`tokensparse.subllm.training.make_optimizer`) and the step factory pretraining uses
(:func:`tokensparse.train.make_train_step` with the step-aware loss). Steps are compiled, warmed up
and timed ABBA-interleaved; ``train_throughput_ratio@<T>`` = dense step time / SUBLLM step time
(tokens/s ratio, larger is better). ``train_activation_ratio@<T>`` = SUBLLM / dense compile-only
temporary bytes of the train step (activations + workspace, :func:`tokensparse.metrics.compiled_memory`)
and ``train_flops_ratio@<T>`` = dense / SUBLLM loop-aware compiled matmul FLOPs.

**Inference** runs at the spec's benchmark capacity, ``--infer_capacity`` (0.75) per level: level l
holds at most ``ceil(0.75 · level l-1)`` tokens, first come first served, and its decode caches are
allocated at that size. Random weights score about half the tokens positive, not the ``keep`` a
trained Balancer gives, so θ is calibrated per level on the prompt
(:func:`tokensparse.subllm.calibrate.calibrate_thresholds`; level 2 is fitted on the tokens level 1
keeps) to the structure's keep ratios (0.64 per level). Per level the rows report the keep rate after
the prefill (kept / level input) and the overflow rate: the share of the tokens scoring above θ that
found the level full (first-come capacity turned them away); ``overflow_rate_<level>@<T>``.

``prefill_flops_ratio@<T>`` = dense / SUBLLM loop-aware compiled matmul FLOPs of the prefill of a
``T``-token prompt (:mod:`tokensparse.flops`; compile only). **Decoding**: batch ``--decode_batch``;
prefill the first ``T − decode_tokens`` of ``T`` random tokens, then time ``decode_tokens`` steps that
feed the rest (teacher forcing: greedy tokens of random weights repeat one token, which a level then
keeps every time or never, so greedy decoding would time the levels at the wrong keep rates; per-token
latency, first token excluded: it comes from the prefill), the two models alternating token by token
(two runs; the order flips every token). The rows report each level's keep rate over the decoded
tokens (``decode_keep_rates``; ``decode_keep_rate_<level>@<T>``). Decode attends only over each
cache's filled prefix (:mod:`tokensparse.decode`).
``decode_speedup@<T>`` = dense / SUBLLM per-token time. ``kv_allocated_ratio@<T>`` and
``kv_occupied_ratio@<T>`` = SUBLLM / dense KV bytes allocated (cache buffers) and occupied (tokens
held after the prefill).
Absolute times mean something only on a GPU or TPU; on a CPU read the ratios.
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from experiments import _checks
from experiments.bench import timing, write_result
from experiments.bench.inputs import random_batch, resolve_dtype
from experiments.bench.timing import timed_step
from tokensparse import attention, decode, train
from tokensparse.config import DTYPES, TrainConfig
from tokensparse.flops import compiled_flops
from tokensparse.generate import Decoder
from tokensparse.metrics import compiled_memory
from tokensparse.remat import REMAT_POLICIES
from tokensparse.subllm import decode as subllm_decode
from tokensparse.subllm import training as subllm_training
from tokensparse.subllm.calibrate import calibrate_thresholds
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import dense_twin, subllm_preset, subllm_preset_names

_PRESET = flags.DEFINE_string("preset", "subllm-small", "SUBLLM preset (random weights).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows per training step.")
_REPS = flags.DEFINE_integer("reps", 5, "Timed training repetitions per model (median; 0: compile-only "
                             "training rows, no timing).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed training steps per model after compiling.")
_TRAIN = flags.DEFINE_bool("train", True, "Time training (false: inference rows only).")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 32, "Timed decode steps per model (0: skip every "
                                     "inference measurement).")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1, "Sequences decoded together.")
_CAPACITY = flags.DEFINE_float("infer_capacity", 0.75, "Inference capacity per level, in (0, 1]: "
                               "level l holds at most ceil(capacity · level l-1) tokens (the spec's "
                               "benchmarks: 0.75).")
_ATTENTION = flags.DEFINE_string("attention", "auto", "Attention backend of both models.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Parameter and compute dtype (auto: bfloat16 on a GPU "
                             "or TPU, float32 on a CPU, where bf16 dots are slow).")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy of both models.")
_OUT = flags.DEFINE_string("out", "bench_results/subllm_speed.json", "Where to write the JSON "
                           "(and its figure, the same path with .png).")

_checks.one_of(_PRESET, subllm_preset_names())
_checks.int_list(_SEQ_LENS, minimum=2)
_checks.at_least(_BATCH, 1)
_checks.at_least(_REPS, 0)
_checks.at_least(_WARMUP, 0)
_checks.at_least(_DECODE_TOKENS, 0)
_checks.at_least(_DECODE_BATCH, 1)
_checks.in_range(_CAPACITY, 0.0, 1.0, include_high=True)
_checks.one_of(_ATTENTION, _checks.attention_backends())
_checks.one_of(_DTYPE, ("auto", *DTYPES))
_checks.one_of(_REMAT, REMAT_POLICIES)


@flags.multi_flags_validator(["seq_lens", "decode_tokens"],
                             "--decode_tokens must be smaller than every --seq_lens (the prompt is "
                             "T - decode_tokens tokens).")
def _prompt_left(values) -> bool:
    lengths = [int(t) for t in values["seq_lens"] if t.strip().isdigit()]
    return not lengths or values["decode_tokens"] < min(lengths)

MODELS = ("dense", "subllm")


def configs(seq_len: int, thresholds: float | tuple[float, ...] = 0.0):
    base = subllm_preset(_PRESET.value)
    model = base.model.replace(dtype=resolve_dtype(_DTYPE.value), param_dtype=resolve_dtype(_DTYPE.value),
                               max_positions=max(base.model.max_positions, seq_len))
    sub = base.replace(model=model, infer_threshold=thresholds, infer_capacity=_CAPACITY.value)
    return {"dense": dense_twin(sub), "subllm": sub}


def build(config) -> SubLLM:
    return SubLLM(config, attention_backend=_ATTENTION.value, remat=_REMAT.value, rngs=nnx.Rngs(0))


def measure_training(seq_len: int) -> dict[str, dict]:
    tc = TrainConfig(seq_len=seq_len, batch_size=_BATCH.value)
    step = train.make_train_step(subllm_training.train_loss(), pass_step=True)
    runs, rows = {}, {}
    for name, config in configs(seq_len).items():
        model = build(config)
        optimizer = nnx.Optimizer(model, subllm_training.make_optimizer(tc), wrt=nnx.Param)
        batch = random_batch(config.model.vocab_size, _BATCH.value, seq_len)
        cost = compiled_memory(step, model, optimizer, batch)
        for _ in range(max(_WARMUP.value, 1) if _REPS.value else 0):
            timed_step(step, model, optimizer, batch)
        runs[name] = functools.partial(lambda *args: timed_step(*args)[0], step, model, optimizer, batch)
        rows[name] = {"preset": _PRESET.value, "model": name, "structure": config.structure,
                      "seq_len": seq_len, "batch_size": _BATCH.value, "dtype": resolve_dtype(_DTYPE.value),
                      "remat": _REMAT.value,
                      "attention": attention.model_backend(_ATTENTION.value, config.model,
                                                           seq_len=seq_len, batch=_BATCH.value),
                      "temp_bytes": cost.temp_bytes, "arg_bytes": cost.argument_bytes, "flops": cost.flops}
    if not _REPS.value:
        return rows
    timings = timing.interleaved(runs, _REPS.value)
    for name, row in rows.items():
        row["train_times_s"], row["train_step_s"] = timings[name]["times_s"], timings[name]["median_s"]
        row["train_tokens_per_s"] = _BATCH.value * seq_len / row["train_step_s"]
    return rows


def decode_tokens_timed(decoders: dict[str, Decoder], prompt: np.ndarray, continuation: np.ndarray,
                        flip: bool = False
                        ) -> dict[str, tuple[list[float], list[float], list[int], list[int]]]:
    """Per model: per-token wall-clock and process CPU seconds of decode steps that feed
    ``continuation`` [B, n] after a prefill of ``prompt`` (teacher forcing: the decoded tokens come
    from the same distribution as the prompt, so the levels keep them at the calibrated rates;
    greedy tokens of a random-weight model repeat and would not), how many tokens each cache
    group gained, and per token its depth (how many inner groups it entered in some row: at batch
    1, how many nested levels kept it). The models alternate token by token (their order flips
    every token, and ``flip`` starts with the other one), so both see the same machine state. CPU
    time, all threads, is the steadier cost measure on a shared machine."""
    lengths = np.full(prompt.shape[0], prompt.shape[1], np.int32)
    caches, before, held, out = {}, {}, {}, {}
    for name, decoder in decoders.items():
        caches[name] = decoder.prefill(prompt, lengths)[1]
        before[name] = [int(np.sum(x)) for x in caches[name].lengths]
        held[name] = before[name][1:]  # tokens the inner groups hold so far
        out[name] = ([], [], [], [])
    names = list(decoders)
    for i in range(continuation.shape[1]):
        for name in (names if (i % 2 == 0) != flip else names[::-1]):
            start, start_cpu = time.perf_counter(), time.process_time()
            logits, caches[name] = decoders[name].step(caches[name], continuation[:, i].astype(np.int32),
                                                       lengths + i)
            jax.block_until_ready(logits)
            out[name][0].append(time.perf_counter() - start)
            out[name][1].append(time.process_time() - start_cpu)
            now = [int(np.sum(x)) for x in caches[name].lengths[1:]]
            out[name][3].append(sum(n > was for n, was in zip(now, held[name], strict=True)))
            held[name] = now
    for name, cache in caches.items():
        out[name][2].extend(int(np.sum(x)) - b for x, b in zip(cache.lengths, before[name], strict=True))
    return out


def subsamplers(model: SubLLM) -> list[tuple[int, int]]:
    """Per subsampler (group ``j + 1``): its nesting level and the cache group it scores."""
    levels = [op.level for op in model.structure.ops if op.kind == "down"]
    return list(zip(levels, subllm_decode.parent_groups(model.structure), strict=True))


def decode_keep_rates(model: SubLLM, gained: list[int]) -> list[float]:
    """Per nesting level: the decoded tokens its groups kept / those their parent groups kept."""
    counts: dict[int, np.ndarray] = {}  # level: parents' tokens, kept
    for j, (level, parent) in enumerate(subsamplers(model)):
        counts[level] = counts.get(level, np.zeros(2)) + [gained[parent], gained[j + 1]]
    return [float(kept / max(total, 1)) for total, kept in counts.values()]


def level_rates(model: SubLLM, prompt: np.ndarray, max_len: int) -> dict[str, list[float]]:
    """Per nesting level (outermost first), on the prefill of ``prompt`` with caches for
    ``max_len``: the keep rate (kept / level input tokens) and the overflow rate (tokens scoring
    above θ that found the level full / tokens scoring above θ)."""
    lay = subllm_decode.layout(model, max_len)

    @nnx.jit
    def run(m, tokens):
        return m.forward(tokens, mode="infer", capacities=lay.group_sizes[1:])[1]

    aux = run(model, jnp.asarray(prompt))
    counts: dict[int, np.ndarray] = {}  # level: input, wanted, kept
    for j, (level, parent) in enumerate(subsamplers(model)):
        segs = np.zeros(prompt.shape, np.int32) if parent == 0 else np.asarray(aux["segment_ids"][parent - 1])
        valid = segs >= 0
        wanted = valid & (np.asarray(aux["scores"][j]) > model.subllm_config.level_threshold(level))
        counts[level] = counts.get(level, np.zeros(3)) + [
            valid.sum(), wanted.sum(), np.asarray(aux["selections"][j].valid).sum()]
    return {"level_keep_rates": [float(c[2] / c[0]) for c in counts.values()],
            "level_overflow_rates": [float((c[1] - c[2]) / max(c[1], 1)) for c in counts.values()]}


def prefill_flops(decoder: Decoder, seq_len: int) -> float:
    """Loop-aware compiled matmul FLOPs of the prefill of one ``seq_len``-token prompt per row."""
    tokens = jax.ShapeDtypeStruct((_DECODE_BATCH.value, seq_len), jnp.int32)
    lengths = jax.ShapeDtypeStruct((_DECODE_BATCH.value,), jnp.int32)
    return compiled_flops(decoder.lower_prefill(tokens, lengths).compile())


def measure_inference(seq_len: int) -> dict[str, dict]:
    n = _DECODE_TOKENS.value
    probe = build(configs(seq_len)["subllm"])
    tokens = np.asarray(random_batch(probe.config.vocab_size, _DECODE_BATCH.value, seq_len).tokens)
    prompt, continuation = tokens[:, :seq_len - n], tokens[:, seq_len - n:]
    thetas = calibrate_thresholds(probe, prompt)
    rows, decoders = {}, {}
    for name, config in configs(seq_len, thetas).items():
        decoders[name] = Decoder(build(config), seq_len)
    decode_tokens_timed(decoders, prompt, continuation[:, :2])  # compile + warm up
    per_token: dict[str, list[float]] = {name: [] for name in MODELS}
    per_token_cpu: dict[str, list[float]] = {name: [] for name in MODELS}
    per_token_depth: dict[str, list[int]] = {name: [] for name in MODELS}
    gained: dict[str, list[int]] = {}
    for rep in range(2):  # two full runs of n tokens, each token timed AB then BA alternately
        for name, (times, cpu, gained[name], depths) in decode_tokens_timed(
                decoders, prompt, continuation, flip=rep == 1).items():
            per_token[name] += times
            per_token_cpu[name] += cpu
            per_token_depth[name] += depths
    for name, decoder in decoders.items():
        model = decoder.model
        lay = subllm_decode.layout(model, seq_len)
        _, cache = decoder.prefill(prompt, np.full(prompt.shape[0], prompt.shape[1], np.int32))
        rows[name] = {
            "preset": _PRESET.value, "model": name, "seq_len": seq_len, "prompt_len": prompt.shape[1],
            "decode_batch": _DECODE_BATCH.value, "decode_tokens": n, "dtype": resolve_dtype(_DTYPE.value),
            "infer_capacity": _CAPACITY.value, "thresholds": list(thetas) if name == "subllm" else [],
            "cache_sizes": list(lay.group_sizes),
            "kv_allocated_bytes": cache.nbytes(),
            "kv_occupied_bytes": float(decode.occupied_bytes(cache, lay.layer_groups)),
            "prefill_flops": prefill_flops(decoder, seq_len),
            "decode_token_s": statistics.median(per_token[name]), "decode_times_s": per_token[name],
            "decode_token_cpu_s": statistics.median(per_token_cpu[name]),
            "decode_token_s_by_depth": by_depth(per_token[name], per_token_depth[name]),
            **level_rates(model, prompt, seq_len),
            "decode_keep_rates": decode_keep_rates(model, gained[name])}
    return rows


def by_depth(times: list[float], depths: list[int]) -> dict[str, dict[str, float]]:
    """Per token depth (how many nested levels kept the token; always 0 for the dense twin): how
    many decoded tokens went that deep, and their median seconds."""
    return {str(d): {"tokens": depths.count(d),
                     "median_s": statistics.median(t for t, e in zip(times, depths, strict=True) if e == d)}
            for d in sorted(set(depths))}


def ratio(rows: dict, key: str, inverse: bool = False) -> float:
    """dense / SUBLLM of ``key`` (SUBLLM / dense with ``inverse``)."""
    dense, sub = rows["dense"][key], rows["subllm"][key]
    return sub / dense if inverse else dense / sub


def main(argv):
    del argv
    rows, summary = [], {}
    print(f"{'T':>6} {'model':>7} {'train ms':>9} {'tok/s':>8} {'decode ms':>10} {'KV MiB alloc':>13} "
          f"{'KV MiB used':>12}")
    for seq_len in map(int, _SEQ_LENS.value):
        train_rows = measure_training(seq_len) if _TRAIN.value else {}
        infer_rows = measure_inference(seq_len) if _DECODE_TOKENS.value else {}
        for name in MODELS:
            row = {**train_rows.get(name, {}), **infer_rows.get(name, {})}
            rows.append(row)
            print(f"{seq_len:>6} {name:>7} {row.get('train_step_s', 0) * 1e3:>9.1f} "
                  f"{row.get('train_tokens_per_s', 0):>8.0f} {row.get('decode_token_s', 0) * 1e3:>10.2f} "
                  f"{row.get('kv_allocated_bytes', 0) / 2**20:>13.1f} "
                  f"{row.get('kv_occupied_bytes', 0) / 2**20:>12.1f}",
                  flush=True)
        if train_rows and _REPS.value:
            summary[f"train_throughput_ratio@{seq_len}"] = ratio(train_rows, "train_step_s")
        if train_rows:
            summary[f"train_flops_ratio@{seq_len}"] = ratio(train_rows, "flops")
            summary[f"train_activation_ratio@{seq_len}"] = ratio(train_rows, "temp_bytes", inverse=True)
        if infer_rows:
            summary[f"prefill_flops_ratio@{seq_len}"] = ratio(infer_rows, "prefill_flops")
            summary[f"decode_speedup@{seq_len}"] = ratio(infer_rows, "decode_token_s")
            summary[f"decode_cpu_speedup@{seq_len}"] = ratio(infer_rows, "decode_token_cpu_s")
            summary[f"kv_allocated_ratio@{seq_len}"] = ratio(infer_rows, "kv_allocated_bytes", inverse=True)
            summary[f"kv_occupied_ratio@{seq_len}"] = ratio(infer_rows, "kv_occupied_bytes", inverse=True)
            for level, rate in enumerate(infer_rows["subllm"]["level_overflow_rates"], start=1):
                summary[f"overflow_rate_{level}@{seq_len}"] = rate
            for level, rate in enumerate(infer_rows["subllm"]["decode_keep_rates"], start=1):
                summary[f"decode_keep_rate_{level}@{seq_len}"] = rate
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "subllm_speed", rows, summary, settings={
        "preset": _PRESET.value, "reps": _REPS.value, "warmup": max(_WARMUP.value, 1),
        "infer_capacity": _CAPACITY.value, "threshold_calibration": "per level, to the structure's keep",
        "timing": "median, ABBA-interleaved, compile excluded; decode: per token, first excluded, "
                  "the models alternating token by token (order flipped every token)",
        "decode_tokens": "teacher-forced: the random continuation of the prompt"})


if __name__ == "__main__":
    _checks.run(main)
