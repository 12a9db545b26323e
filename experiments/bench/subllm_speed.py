"""SUBLLM vs its dense twin: training throughput, decode latency and KV-cache bytes, side by side.

    python -m experiments.bench.subllm_speed --out bench_results/subllm_speed.json \\
        [--preset=subllm-small --seq_lens=2048,4096 --batch_size=1 --reps=8 --decode_tokens=32]
    # On a GPU, the paper's model:
    python -m experiments.bench.subllm_speed --preset=subllm-1.3b --seq_lens=4096,8192

**Training**: both models are the same class built from the same preset (the twin has structure
``"T"*n``: identical backbone, no SUBLLM modules), with random weights, the same AdamW recipe
(:func:`tokensparse.subllm.training.make_optimizer`) and the step factory pretraining uses
(:func:`tokensparse.train.make_train_step` with the step-aware loss). Steps are compiled, warmed up
and timed ABBA-interleaved; ``train_throughput_ratio@<T>`` = dense step time / SUBLLM step time
(tokens/s ratio, larger is better). Rows also carry compile-only activation bytes and FLOPs.

**Decoding**: batch ``--decode_batch``; prefill a prompt of ``T − decode_tokens`` random tokens, then
time ``decode_tokens`` steps (per-token latency, first token excluded: it comes from the prefill).
Random weights score about half the tokens positive, not the 64 % a trained Balancer gives, so the
threshold θ is set to the 36th percentile of the level-1 scores on the prompt; the keep rates the
run actually saw are reported per level. ``decode_speedup@<T>`` = dense / SUBLLM per-token time.
``kv_cache_ratio@<T>`` = SUBLLM / dense occupied KV bytes after the prefill (the spec's token-linear
bound for 0.64 per level is 0.75 for the 24-layer structure); allocated bytes are reported too
(inference capacity 1.0 allocates every level at full length).
Absolute times mean something only on a GPU or TPU; on a CPU read the ratios.
"""

from __future__ import annotations

import functools
import json
import statistics
import time

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
from tokensparse.generate import Decoder
from tokensparse.metrics import compiled_memory
from tokensparse.remat import REMAT_POLICIES
from tokensparse.subllm import decode as subllm_decode
from tokensparse.subllm import training as subllm_training
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import dense_twin, subllm_preset, subllm_preset_names

_PRESET = flags.DEFINE_string("preset", "subllm-small", "SUBLLM preset (random weights).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows per training step.")
_REPS = flags.DEFINE_integer("reps", 8, "Timed training repetitions per model (median; at least 5).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed training steps per model after compiling.")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 32, "Timed decode steps per model (0: skip).")
_DECODE_BATCH = flags.DEFINE_integer("decode_batch", 1, "Sequences decoded together.")
_KEEP_RATE = flags.DEFINE_float("decode_keep_rate", 0.64, "Level-1 keep rate θ is calibrated to.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "Attention backend of both models.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Parameter and compute dtype (auto: bfloat16 on a GPU "
                             "or TPU, float32 on a CPU, where bf16 dots are slow).")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy of both models.")
_OUT = flags.DEFINE_string("out", "bench_results/subllm_speed.json", "Where to write the JSON "
                           "(and its figure, the same path with .png).")

_checks.one_of(_PRESET, subllm_preset_names())
_checks.int_list(_SEQ_LENS, minimum=2)
_checks.at_least(_BATCH, 1)
_checks.at_least(_REPS, 1)
_checks.at_least(_WARMUP, 0)
_checks.at_least(_DECODE_TOKENS, 0)
_checks.at_least(_DECODE_BATCH, 1)
_checks.in_range(_KEEP_RATE, 0.0, 1.0)
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


def configs(seq_len: int, threshold: float = 0.0):
    base = subllm_preset(_PRESET.value)
    model = base.model.replace(dtype=resolve_dtype(_DTYPE.value), param_dtype=resolve_dtype(_DTYPE.value),
                               max_positions=max(base.model.max_positions, seq_len))
    sub = base.replace(model=model, infer_threshold=threshold)
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
        for _ in range(max(_WARMUP.value, 1)):
            timed_step(step, model, optimizer, batch)
        runs[name] = functools.partial(lambda *args: timed_step(*args)[0], step, model, optimizer, batch)
        rows[name] = {"preset": _PRESET.value, "model": name, "structure": config.structure,
                      "seq_len": seq_len, "batch_size": _BATCH.value, "dtype": resolve_dtype(_DTYPE.value),
                      "remat": _REMAT.value,
                      "attention": attention.model_backend(_ATTENTION.value, config.model,
                                                           seq_len=seq_len, batch=_BATCH.value),
                      "temp_bytes": cost.temp_bytes, "arg_bytes": cost.argument_bytes, "flops": cost.flops}
    timings = timing.interleaved(runs, max(_REPS.value, 5))
    for name, row in rows.items():
        row["train_times_s"], row["train_step_s"] = timings[name]["times_s"], timings[name]["median_s"]
        row["train_tokens_per_s"] = _BATCH.value * seq_len / row["train_step_s"]
    return rows


def calibrated_threshold(model: SubLLM, prompt) -> float:
    """θ such that ``--decode_keep_rate`` of the prompt's level-1 scores exceed it."""
    _, aux = nnx.jit(lambda m, t: m.forward(t, mode="infer"))(model, jnp.asarray(prompt))
    return float(np.quantile(np.asarray(aux["scores"][0]), 1.0 - _KEEP_RATE.value))


def decode_tokens_timed(decoder: Decoder, prompt: np.ndarray, n: int) -> list[float]:
    """Per-token seconds of ``n`` greedy decode steps after a prefill of ``prompt``."""
    lengths = np.full(prompt.shape[0], prompt.shape[1], np.int32)
    logits, cache = decoder.prefill(prompt, lengths)
    tokens = np.asarray(jnp.argmax(logits, -1), np.int32)
    times = []
    for i in range(n):
        start = time.perf_counter()
        logits, cache = decoder.step(cache, tokens, lengths + i)
        tokens = np.asarray(jnp.argmax(logits, -1), np.int32)  # blocks: the next step needs it
        times.append(time.perf_counter() - start)
    return times


def measure_decoding(seq_len: int) -> dict[str, dict]:
    n = _DECODE_TOKENS.value
    probe = build(configs(seq_len)["subllm"])
    prompt = random_batch(probe.config.vocab_size, _DECODE_BATCH.value, seq_len - n).tokens
    theta = calibrated_threshold(probe, prompt)
    rows = {}
    decoders = {}
    for name, config in configs(seq_len, theta).items():
        model = build(config)
        decoders[name] = Decoder(model, seq_len)
        decode_tokens_timed(decoders[name], prompt, 2)  # compile + warm up
    per_token: dict[str, list[float]] = {name: [] for name in MODELS}
    for rep in range(2):  # AB then BA, each a full run of n tokens
        for name in (MODELS if rep == 0 else MODELS[::-1]):
            per_token[name] += decode_tokens_timed(decoders[name], prompt, n)
    for name, decoder in decoders.items():
        model = decoder.model
        groups = subllm_decode.layout(model, seq_len).layer_groups
        _, cache = decoder.prefill(prompt, np.full(prompt.shape[0], prompt.shape[1], np.int32))
        lengths = [np.asarray(x).mean() for x in cache.lengths]
        parents = subllm_decode.parent_groups(model.structure)
        rows[name] = {
            "preset": _PRESET.value, "model": name, "seq_len": seq_len, "prompt_len": seq_len - n,
            "decode_batch": _DECODE_BATCH.value, "decode_tokens": n, "dtype": resolve_dtype(_DTYPE.value),
            "threshold": theta if name == "subllm" else None,
            "decode_token_s": statistics.median(per_token[name]), "decode_times_s": per_token[name],
            "kv_allocated_bytes": cache.nbytes(),
            "kv_occupied_bytes": float(decode.occupied_bytes(cache, groups)),
            "level_keep_rates": [float(lengths[j + 1] / lengths[parent]) for j, parent in enumerate(parents)]}
    return rows


def main(argv):
    del argv
    rows, summary = [], {}
    print(f"{'T':>6} {'model':>7} {'train ms':>9} {'tok/s':>8} {'decode ms':>10} {'KV MiB':>7}")
    for seq_len in map(int, _SEQ_LENS.value):
        train_rows = measure_training(seq_len)
        decode_rows = measure_decoding(seq_len) if _DECODE_TOKENS.value else {}
        for name in MODELS:
            row = {**train_rows[name], **decode_rows.get(name, {})}
            rows.append(row)
            print(f"{seq_len:>6} {name:>7} {row['train_step_s'] * 1e3:>9.1f} "
                  f"{row['train_tokens_per_s']:>8.0f} {row.get('decode_token_s', 0) * 1e3:>10.2f} "
                  f"{row.get('kv_occupied_bytes', 0) / 2**20:>7.1f}", flush=True)
        summary[f"train_throughput_ratio@{seq_len}"] = (train_rows["dense"]["train_step_s"]
                                                        / train_rows["subllm"]["train_step_s"])
        summary[f"train_flops_ratio@{seq_len}"] = train_rows["dense"]["flops"] / train_rows["subllm"]["flops"]
        if decode_rows:
            summary[f"decode_speedup@{seq_len}"] = (decode_rows["dense"]["decode_token_s"]
                                                    / decode_rows["subllm"]["decode_token_s"])
            summary[f"kv_cache_ratio@{seq_len}"] = (decode_rows["subllm"]["kv_occupied_bytes"]
                                                    / decode_rows["dense"]["kv_occupied_bytes"])
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "subllm_speed", rows, summary, settings={
        "preset": _PRESET.value, "reps": max(_REPS.value, 5), "warmup": max(_WARMUP.value, 1),
        "decode_keep_rate_calibration": _KEEP_RATE.value,
        "timing": "median, ABBA-interleaved, compile excluded; decode: per token, first excluded"})


if __name__ == "__main__":
    _checks.run(main)
