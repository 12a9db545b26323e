"""Kernel benchmarks: Pallas segment attention and LeMo block scoring against their baselines.

    python -m experiments.bench.kernels --out bench_results/kernels.json [--sweep]   # GPU / TPU
    python -m experiments.bench.kernels --out bench_results/kernels_cpu.json         # CPU: correctness

**On a GPU or TPU** (timings): causal bf16 self-attention, B=1, ``--heads`` 32, ``--head_dim`` 128,
``--kv_heads`` 8, T in ``--seq_lens`` (2K-32K): forward and forward+backward of our kernel, of
``jax.nn.dot_product_attention`` (cuDNN on a GPU) and of the XLA reference (which materialises the
logits, so it runs out of memory at long T: such rows record the error). All run in this process on
the same inputs, interleaved, median of ``--reps`` after warm-up. TFLOP/s count only the FLOPs the mask
needs: the visible (query, key) pairs (causal, diagonal included; for the packed rows,
``pallas_packed<n>``, only pairs inside one document), 4·H·D per pair forward and 3.5 times that
forward+backward (FlashAttention-2's count). Every row names the kernel settings it ran with
(``kernel_config``); the JSON's ``config`` is that setting, ``config_source`` says whether it is
:func:`~kernels_pallas.segment_attention.default_config` (what the models use) or a ``--sweep``
winner, and ``default_config`` is the default for comparison. ``--baselines`` picks the baselines
(the XLA reference materialises the logits: slow, and out of memory at long T).
Then LeMo block scoring at ``--score_seq_len`` (16K) with SmolLM2's head layout (9/3 heads, D=64):
the Pallas kernel vs the dense reference (``[B, H, T, T]`` logits) and the XLA scan.
Summary: ``fwd_bwd_vs_cudnn@<T>`` and ``fwd_vs_cudnn@<T>`` (cuDNN time / ours; 1.0 = parity),
``fwd_bwd_vs_xla@<T>``, ``block_scores_vs_dense@<T>`` and ``block_scores_vs_scan@<T>`` (baseline
time / kernel time). ``--sweep`` first tries a few block/warp/stage settings at the largest T.
The JSON's ``git`` is the commit (``TOKENSPARSE_GIT_COMMIT`` where the checkout has no ``.git``).

**On CPU** the kernels only run in interpret mode, so timings say nothing about them; the script
says so and runs a correctness sweep instead: every kernel (the Triton-path segment attention, its
TPU variant under the TPU interpreter when present, and block scoring) against the dense reference
on small random inputs with packed segments, padded slots, GQA, ragged lengths and compacted
positions; forward and gradients. Summary: the worst relative error per dtype and ``all_pass``
(fp32 <= 1e-5, bf16 <= 2e-2). ``bench_results/attention_kernel.json`` is an H100 run of this
script's attention part under its former name, ``experiments.bench.attention_kernel``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments import _checks
from experiments.bench import write_result
from kernels_pallas import block_scores as score_kernel
from kernels_pallas.reference import BlockSizes
from kernels_pallas.segment_attention import default_config, segment_attention

_OUT = flags.DEFINE_string("out", None, "JSON output path (default: bench_results/kernels.json, "
                           "or bench_results/kernels_cpu.json on CPU).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384", "32768"],
                              "Attention sequence lengths.")
_KV_HEADS = flags.DEFINE_list("kv_heads", ["8"], "KV head counts (GQA groups = heads / Hkv); the "
                              "headline keys use the smallest.")
_HEADS = flags.DEFINE_integer("heads", 32, "Query heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions (median), after 2 warm-up calls.")
_SWEEP = flags.DEFINE_bool("sweep", False, "Try a few kernel settings first and use the best.")
_CHECK = flags.DEFINE_bool("check_defaults", False, "First check default_config() for fp32/bf16 "
                            "and D in {64, 128, 256} against the dense reference.")
_SCORE_T = flags.DEFINE_integer("score_seq_len", 16384, "Block-scoring sequence length.")
_SCORE_HEADS = flags.DEFINE_list("score_heads", ["9", "3", "64"], "Block scoring: query heads, KV "
                                 "heads, head dim (SmolLM2-135M's).")
_KERNELS = flags.DEFINE_list("kernels", ["segment_attention", "segment_attention_tpu",
                                          "block_scores"],
                             "Kernels the correctness sweep checks (those this checkout has).")
_BASELINES = flags.DEFINE_list("baselines", ["library", "xla"], "Attention baselines to time: "
                                "library (jax.nn.dot_product_attention: cuDNN on a GPU), xla (the "
                                "dense reference).")
_PACKED = flags.DEFINE_integer("packed_segments", 4, "Documents in the packed-sequence rows "
                               "(0: no packed rows).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny shapes everywhere (tests); on CPU the timing "
                           "path then runs in interpret mode against the XLA baselines.")

KERNELS = ("segment_attention", "segment_attention_tpu", "block_scores")
_checks.int_list(_SEQ_LENS, minimum=16)
_checks.int_list(_KV_HEADS)
_checks.int_list(_SCORE_HEADS)
flags.register_validator(_SCORE_HEADS, lambda v: len(v) == 3,
                         "give three integers: query heads, KV heads, head dim.")
_checks.at_least(_REPS, 1)
_checks.at_least(_SCORE_T, 64, multiple_of=64, why="whole 64-token blocks")
_checks.one_of(_KERNELS, KERNELS)
_checks.one_of(_BASELINES, ("library", "xla"))
_checks.at_least(_PACKED, 0)

# H100, first sweep (bf16, D=128, T=8192, Hkv=8), fwd ms: 128x64 w8 s2 2.02, 128x64 w8 s3 1.90,
# 128x128 w8 s2 1.77, 64x64 w4 s3 2.95, 128x64 w4 s3 1.84; fwd+bwd ms with dq/dkv blocks:
# 64/64 w8 s2 11.0, 64/64 w4 s2 6.46, dq 128x64 dkv 64x128 w8 14.8, dq 64x128 dkv 32x128 w8 9.66,
# 64/64 w4 s3 7.27. Second sweep (the lists below): fwd 128x128 w8 s2 1.60, s3 1.58, w4 s3 2.84,
# 64x128 w4 s3 1.85; fwd+bwd 64/64 w4 s2 5.81, dq 128x32 + dkv 32x128 (Triton tutorial shapes)
# 44-49 (the 128-row dk/dv accumulators spill), dq 128x32 + dkv 64x64 5.99, 32x64/64x32 8.93.
FWD_VARIANTS = [  # block_q, block_k, num_warps, num_stages
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 4, 3), (64, 128, 4, 3),
]
BWD_VARIANTS = [  # block_q_dq, block_k_dq, block_q_dkv, block_k_dkv, num_warps_bwd, stages_bwd
    (64, 64, 64, 64, 4, 2), (128, 32, 32, 128, 4, 3), (128, 32, 32, 128, 4, 2),
    (64, 64, 32, 128, 4, 2), (128, 32, 64, 64, 4, 2), (32, 64, 64, 32, 4, 2),
]


SWEEP_TOL = {"float32": 1e-5, "bfloat16": 2e-2}


def _inputs(t: int, hkv: int, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 4)
    h, d = _HEADS.value, _HEAD_DIM.value
    q = jax.random.normal(keys[0], (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, hkv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, t, hkv, d), jnp.bfloat16)
    cot = jax.random.normal(keys[3], (1, t, h, d), jnp.bfloat16)
    return q, k, v, cot


def _interpret() -> bool:
    return jax.default_backend() not in ("gpu", "tpu")


def _flat(cfg: dict) -> dict:
    """A kernel config as JSON: its ``BlockSizes`` spelled out next to the launch parameters."""
    blocks = cfg.get("blocks")
    rest = {k: v for k, v in cfg.items() if k != "blocks"}
    return {**(dataclasses.asdict(blocks) if blocks is not None else {}), **rest}


def packed_layout(t: int, segments: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Positions and segment ids ``[t]`` of ``segments`` packed documents of equal length (give or
    take one token), positions restarting in each; one causal document (no ids) for 0 or 1."""
    pos = np.arange(t, dtype=np.int32)
    if segments <= 1:
        return pos, None
    seg = (pos.astype(np.int64) * segments // t).astype(np.int32)
    starts = np.searchsorted(seg, np.arange(segments))
    return (pos - starts[seg]).astype(np.int32), seg


def visible_pairs(t: int, segments: int = 0) -> int:
    """(query, key) pairs causal attention over :func:`packed_layout` must compute: L(L+1)/2 per
    document of length L (the diagonal included), not the T(T+1)/2 of one dense causal sequence."""
    _, seg = packed_layout(t, segments)
    lengths = np.bincount(seg) if seg is not None else np.array([t])
    return int((lengths * (lengths + 1) // 2).sum())


def attention_flops(pairs: int, heads: int, head_dim: int) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of attention over ``pairs`` visible (query, key) pairs:
    QKᵀ and PV cost 2·D each per pair and head; the backward's five products 2.5 times that."""
    fwd = 4.0 * pairs * heads * head_dim
    return fwd, 3.5 * fwd


def _pallas(cfg: dict, segments: int = 0):
    """Our kernel on packed documents (:func:`packed_layout`) or one causal document."""
    def attn(q, k, v):
        t = q.shape[1]
        pos, seg = packed_layout(t, segments)
        pos = jnp.asarray(pos)[None]
        if seg is not None:
            seg = jnp.asarray(seg)[None]
        if jax.default_backend() == "tpu":
            from kernels_pallas.register import pallas_attention
            return pallas_attention(q, k, v, q_positions=pos, kv_positions=pos,
                                    q_segment_ids=seg, kv_segment_ids=seg, causal=True)
        return segment_attention(q, k, v, q_positions=pos, kv_positions=pos, q_segment_ids=seg,
                                 kv_segment_ids=seg, causal=True, interpret=_interpret(), **cfg)
    return attn


def _library(q, k, v):
    """``jax.nn.dot_product_attention``: cuDNN's flash attention on a GPU, XLA elsewhere."""
    impl = "cudnn" if jax.default_backend() == "gpu" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)


def _xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _fns(attn):
    fwd = jax.jit(attn)

    @jax.jit
    def fwd_bwd(q, k, v, cot):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, *vjp(cot)

    return fwd, fwd_bwd


def _time(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _runnable(fns: dict, args_fwd, args_bwd) -> tuple[dict, dict]:
    """Warm every candidate up (compile excluded); those that fail (out of memory) are dropped."""
    ok, errors = {}, {}
    for name, (fwd, fwd_bwd) in fns.items():
        try:
            for _ in range(2):
                _time(fwd, *args_fwd)
                _time(fwd_bwd, *args_bwd)
            ok[name] = (fwd, fwd_bwd)
        except Exception as e:  # e.g. RESOURCE_EXHAUSTED for the XLA reference
            errors[name] = str(e).splitlines()[0][:200]
    return ok, errors


def _median_times(fns: dict, args_fwd, args_bwd, reps: int) -> dict:
    """Interleaved timing: every repetition runs each candidate once, in turn."""
    times = {name: ([], []) for name in fns}
    for _ in range(reps):
        for name, (fwd, fwd_bwd) in fns.items():
            times[name][0].append(_time(fwd, *args_fwd))
            times[name][1].append(_time(fwd_bwd, *args_bwd))
    return {name: (statistics.median(f), statistics.median(b)) for name, (f, b) in times.items()}


def _rel_err(x, ref) -> float:
    """max |x - ref| / max |ref|: the error bound the acceptance tolerances refer to."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(x), finite):
        return float("inf")
    scale = max(np.abs(ref[finite]).max(initial=0.0), 1e-30)
    return float(np.abs(x[finite] - ref[finite]).max(initial=0.0) / scale)


def _sweep(t: int, hkv: int) -> tuple[dict, list[dict]]:
    q, k, v, cot = _inputs(t, hkv)
    cfg = default_config(_HEAD_DIM.value, jnp.bfloat16)
    log = []
    best = (float("inf"), None)
    for bq, bk, warps, stages in FWD_VARIANTS:
        trial = dict(cfg, blocks=dataclasses.replace(cfg["blocks"], block_q=bq, block_k=bk),
                     num_warps=warps, num_stages=stages)
        try:
            fwd = jax.jit(_pallas(trial))
            jax.block_until_ready(fwd(q, k, v))
            ms = 1e3 * statistics.median(_time(fwd, q, k, v) for _ in range(5))
        except Exception as e:  # a setting may not compile (e.g. shared memory)
            log.append({"part": "fwd", "cfg": _flat(trial), "error": str(e)[:200]})
            continue
        log.append({"part": "fwd", "cfg": _flat(trial), "ms": ms})
        print(f"sweep fwd {bq}x{bk} w{warps} s{stages}: {ms:.3f} ms", flush=True)
        best = min(best, (ms, trial), key=lambda x: x[0])
    cfg = best[1] or cfg
    best = (float("inf"), None)
    for bq_dq, bk_dq, bq_dkv, bk_dkv, warps, stages in BWD_VARIANTS:
        blocks = dataclasses.replace(cfg["blocks"], block_q_dq=bq_dq, block_k_dq=bk_dq,
                                     block_q_dkv=bq_dkv, block_k_dkv=bk_dkv)
        trial = dict(cfg, blocks=blocks, num_warps_bwd=warps, num_stages_bwd=stages)
        try:
            _, fwd_bwd = _fns(_pallas(trial))
            jax.block_until_ready(fwd_bwd(q, k, v, cot))
            ms = 1e3 * statistics.median(_time(fwd_bwd, q, k, v, cot) for _ in range(5))
        except Exception as e:
            log.append({"part": "bwd", "cfg": _flat(trial), "error": str(e)[:200]})
            continue
        log.append({"part": "fwd_bwd", "cfg": _flat(trial), "ms": ms})
        print(f"sweep bwd dq {bq_dq}x{bk_dq} dkv {bq_dkv}x{bk_dkv} w{warps} s{stages}: "
              f"{ms:.3f} ms", flush=True)
        best = min(best, (ms, trial), key=lambda x: x[0])
    return best[1] or cfg, log


def _check_defaults() -> list[dict]:
    """Each default tile setting compiles and matches the reference (ragged T, GQA, packed docs)."""
    from tokensparse.attention import reference_attention

    results = []
    t, h, hkv = 1000, 4, 2
    pos = jnp.arange(t, dtype=jnp.int32)[None] % 600
    seg = (jnp.arange(t) >= 600).astype(jnp.int32)[None]
    layout = dict(q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    for dtype in (jnp.float32, jnp.bfloat16):
        for d in (64, 128, 256):
            keys = jax.random.split(jax.random.key(d), 4)
            q = jax.random.normal(keys[0], (1, t, h, d), dtype)
            k, v = (jax.random.normal(key, (1, t, hkv, d), dtype) for key in keys[1:3])
            cot = jax.random.normal(keys[3], (1, t, h, d), jnp.float32)
            cfg = default_config(d, dtype)

            def run(attn, q, k, v, cot, cfg=cfg):
                out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, **layout), q, k, v)
                return out, *vjp(cot.astype(out.dtype))

            ours = functools.partial(segment_attention, interpret=_interpret(), **cfg)
            row = {"dtype": jnp.dtype(dtype).name, "head_dim": d, "cfg": _flat(cfg)}
            try:
                got = jax.jit(functools.partial(run, ours))(q, k, v, cot)
                up = [x.astype(jnp.float32) for x in (q, k, v)]
                with jax.default_matmul_precision("highest"):  # no TF32 in the reference
                    want = jax.jit(functools.partial(run, reference_attention))(*up, cot)
                row["rel_err"] = {n: _rel_err(a, b) for n, a, b in
                                  zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
            except Exception as e:  # report and go on: the table shows which setting fails
                row["error"] = str(e)[:300]
            print("check_defaults", row, flush=True)
            results.append(row)
    return results



# ----------------------------------------------------------------------------- timings (GPU / TPU)


def attention_rows(cfg: dict, seq_lens: list[int], kv_heads: list[int]) -> tuple[list, dict]:
    """Forward and forward+backward times of ours, the library call and the XLA reference."""
    h, d = _HEADS.value, _HEAD_DIM.value
    rows, summary = [], {}
    for t in seq_lens:
        for hkv in kv_heads:
            q, k, v, cot = _inputs(t, hkv)
            packed = f"pallas_packed{_PACKED.value}"
            fns = {"pallas": _fns(_pallas(cfg)), "library": _fns(_library), "xla": _fns(_xla)}
            fns = {n: f for n, f in fns.items() if n == "pallas" or n in _BASELINES.value}
            if _PACKED.value > 1:
                fns[packed] = _fns(_pallas(cfg, segments=_PACKED.value))
            segments = {packed: _PACKED.value}  # the rest: one causal document
            fns, errors = _runnable(fns, (q, k, v), (q, k, v, cot))
            errs = {}
            if "pallas" in fns and "library" in fns:
                got, want = fns["pallas"][1](q, k, v, cot), fns["library"][1](q, k, v, cot)
                errs = {n: _rel_err(a, b) for n, a, b in
                        zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
            med = _median_times(fns, (q, k, v), (q, k, v, cot), _REPS.value)
            base = {"seq_len": t, "heads": h, "kv_heads": hkv, "head_dim": d,
                    "dtype": "bfloat16", "causal": True}
            for name, error in errors.items():
                rows.append({**base, "impl": name, "error": error})
            for name, (fwd_s, fb_s) in med.items():
                pairs = visible_pairs(t, segments.get(name, 0))
                fwd_flops, fb_flops = attention_flops(pairs, h, d)
                rows.append({**base, "impl": name, "segments": max(segments.get(name, 0), 1),
                             "visible_pairs": pairs, "fwd_ms": 1e3 * fwd_s, "fwd_bwd_ms": 1e3 * fb_s,
                             "fwd_tflops": fwd_flops / fwd_s / 1e12,
                             "fwd_bwd_tflops": fb_flops / fb_s / 1e12,
                             **({"kernel_config": _flat(cfg)} if name.startswith("pallas") else {}),
                             **({"rel_err_vs_library": errs} if name == "pallas" else {})})
            tag = f"@{t}" + ("" if hkv == min(kv_heads) else f"_hkv{hkv}")
            if "pallas" not in med:
                continue
            lib = "cudnn" if jax.default_backend() == "gpu" else "library"
            for name, key in (("library", lib), ("xla", "xla")):
                if name in med:
                    summary[f"fwd_vs_{key}{tag}"] = med[name][0] / med["pallas"][0]
                    summary[f"fwd_bwd_vs_{key}{tag}"] = med[name][1] / med["pallas"][1]
    return rows, summary


def score_rows(t: int, heads: tuple[int, int, int]) -> tuple[list, dict]:
    """LeMo block scoring at length ``t``: the kernel vs the dense reference and the XLA scan."""
    from tokensparse.lemo import scoring

    h, hkv, d = heads
    keys = jax.random.split(jax.random.key(1), 2)
    q = jax.random.normal(keys[0], (1, t, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, t, hkv, d), jnp.bfloat16)
    opts = scoring.ScoreOptions()
    fns = {
        "pallas": jax.jit(functools.partial(
            score_kernel.block_tiles, block_size=opts.block_size, scale=1 / opts.normalizer,
            interpret=_interpret())),
        "scan": jax.jit(functools.partial(scoring.block_tiles, opts=opts, backend="xla")),
        "dense": jax.jit(functools.partial(scoring.block_scores_reference, opts=opts)),
    }
    ok, errors = {}, {}
    for name, fn in fns.items():
        try:
            _time(fn, q, k)
            ok[name] = fn
        except Exception as e:  # the dense reference may not fit at long T
            errors[name] = str(e).splitlines()[0][:200]
    times = {name: [] for name in ok}
    for _ in range(_REPS.value):
        for name, fn in ok.items():
            times[name].append(_time(fn, q, k))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    want = next((ok[n](q, k) for n in ("dense", "scan") if n in ok), None)
    err = _rel_err(ok["pallas"](q, k), want) if "pallas" in ok and want is not None else None
    rows = [{"what": "block_scores", "seq_len": t, "heads": h, "kv_heads": hkv, "head_dim": d,
             "dtype": "bfloat16", "impl": name, "ms": 1e3 * s,
             **({"kernel_config": {"block_size": opts.block_size}, "rel_err_vs_reference": err}
                if name == "pallas" else {})}
            for name, s in med.items()]
    rows += [{"what": "block_scores", "seq_len": t, "impl": n, "error": e} for n, e in errors.items()]
    summary = {f"block_scores_vs_{n}@{t}": med[n] / med["pallas"]
               for n in ("dense", "scan") if n in med and "pallas" in med}
    return rows, summary


# ----------------------------------------------------------------------------- correctness sweep


def _layout(rng, b: int, t: int, kind: str):
    """Positions and segment ids of one regime (see the sweep's docstring)."""
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    seg = np.zeros((b, t), np.int32)
    if kind == "packed":  # three documents, positions restarting, then padding slots
        cuts = np.sort(rng.choice(np.arange(8, t - 8), size=2, replace=False))
        seg[:] = np.searchsorted(cuts, np.arange(t), side="right")
        pos[:] = np.arange(t) - np.concatenate([[0], cuts])[seg[0]]
        seg[:, t - 5:] = -1
    elif kind == "compacted":  # a sorted subset of a longer sequence, a few padded slots
        for row in range(b):
            pos[row] = np.sort(rng.choice(4 * t, size=t, replace=False))
        seg[rng.random((b, t)) < 0.15] = -1
    return jnp.asarray(pos), jnp.asarray(seg)


def _attention_impls(wanted: set[str]) -> dict:
    """The wanted attention kernels this checkout has, as fn(q, k, v, **layout), interpreted off
    their own platform."""
    impls = {}
    if "segment_attention" in wanted:
        impls["segment_attention"] = functools.partial(segment_attention, blocks=BlockSizes(16, 16),
                                                       interpret=_interpret())
    tpu_module = "kernels_pallas.segment_attention_tpu"
    if "segment_attention_tpu" in wanted and importlib.util.find_spec(tpu_module) is not None:
        tpu = importlib.import_module(tpu_module)
        impls["segment_attention_tpu"] = functools.partial(
            tpu.segment_attention_tpu, interpret=jax.default_backend() != "tpu")
    return impls


@functools.cache
def _vjp_runner(attn, causal: bool):
    """jit of (q, k, v, layout..., cot) -> (out, dq, dk, dv); layouts are data, so one compile
    serves every regime (at XLA's lowest optimisation level off an accelerator: interpreted
    kernels are slow to optimise and fast to run)."""
    def run(q, k, v, q_pos, kv_pos, q_seg, kv_seg, cot):
        f = lambda q, k, v: attn(q, k, v, q_positions=q_pos, kv_positions=kv_pos,
                                 q_segment_ids=q_seg, kv_segment_ids=kv_seg, causal=causal)
        out, vjp = jax.vjp(f, q, k, v)
        return out, *vjp(cot.astype(out.dtype))

    options = {"xla_backend_optimization_level": 0} if _interpret() else None
    return jax.jit(run, compiler_options=options)


def correctness_sweep(smoke: bool) -> list[dict]:
    """Every kernel vs its dense reference, forward and gradients, on small random inputs.

    Attention regimes: packed documents with padded slots, a compacted subset of positions with
    scattered padding, and a non-causal case whose queries include a segment with no keys (those
    rows must be exactly zero). Lengths are not multiples of the blocks; heads are grouped (GQA).
    """
    from tokensparse.attention import reference_attention
    from tokensparse.lemo import scoring

    rng = np.random.default_rng(0)
    rows = []
    t, h, hkv, d = (40, 4, 2, 16) if smoke else (100, 4, 2, 32)
    regimes = [("packed", True), ("compacted", True), ("no_visible_key", False)]
    dtypes = ("float32",) if smoke else ("float32", "bfloat16")
    wanted = set(_KERNELS.value)
    for impl_name, impl in _attention_impls(wanted).items():
        for (kind, causal), dtype in ((r, dt) for r in regimes for dt in dtypes):
            q, k, v, cot = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
                            ((2, t, h, d), (2, t, hkv, d), (2, t, hkv, d), (2, t, h, d)))
            pos, seg = _layout(rng, 2, t, "packed" if kind == "no_visible_key" else kind)
            q_seg = seg.at[:, ::7].set(5) if kind == "no_visible_key" else seg  # 5: no keys
            layout = (pos, pos, q_seg, seg, cot)
            rounded = [x.astype(dtype) for x in (q, k, v)]
            with jax.default_matmul_precision("highest"):
                got = _vjp_runner(impl, causal)(*rounded, *layout)
                want = _vjp_runner(reference_attention, causal)(
                    *(x.astype(jnp.float32) for x in rounded), *layout)
            errs = {n: _rel_err(a, b) for n, a, b in
                    zip(("out", "dq", "dk", "dv"), got, want, strict=True)}
            finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in got)
            rows.append({"kernel": impl_name, "case": kind, "causal": causal, "dtype": dtype,
                         "shape": [2, t, h, hkv, d], "rel_err": errs, "finite": finite,
                         "pass": finite and max(errs.values()) <= SWEEP_TOL[dtype]})
            print(f"{impl_name:<22} {kind:<15} {dtype:<9} max rel err {max(errs.values()):.2e}",
                  flush=True)
    for dtype in dtypes if "block_scores" in wanted else ():
        for causal in (False, True):
            q = jnp.asarray(rng.normal(size=(2, t, h, d)), dtype)
            k = jnp.asarray(rng.normal(size=(2, t, hkv, d)), dtype)
            valid = jnp.asarray(rng.random((2, t)) > 0.2)
            opts = scoring.ScoreOptions(block_size=16, causal=causal, exclude_diagonal=causal)
            fn = functools.partial(score_kernel.block_tiles, block_size=16, valid=valid,
                                   scale=1 / opts.normalizer, causal=causal,
                                   exclude_diagonal=causal, interpret=_interpret())
            got = jax.jit(fn)(q, k)
            want = scoring.block_scores_reference(q, k, opts, valid=valid)
            want = jnp.where(jnp.isneginf(want), 0.0, want)  # the kernel leaves empty columns 0
            err = _rel_err(got, want)
            rows.append({"kernel": "block_scores", "case": "causal" if causal else "full",
                         "causal": causal, "dtype": dtype, "shape": [2, t, h, hkv, d],
                         "rel_err": {"tiles": err}, "finite": True,
                         "pass": err <= SWEEP_TOL[dtype]})
            print(f"{'block_scores':<22} {rows[-1]['case']:<15} {dtype:<9} max rel err {err:.2e}",
                  flush=True)
    return rows


def _sweep_summary(rows: list[dict]) -> dict:
    summary = {"all_pass": all(r["pass"] for r in rows), "cases": len(rows)}
    for dtype in sorted({r["dtype"] for r in rows}):
        errs = [max(r["rel_err"].values()) for r in rows if r["dtype"] == dtype]
        summary[f"max_rel_err_{dtype}"] = max(errs)
    return summary


# ----------------------------------------------------------------------------- main


def main(argv):
    del argv
    accelerator = jax.default_backend() in ("gpu", "tpu")
    out = _OUT.value or ("bench_results/kernels.json" if accelerator
                         else "bench_results/kernels_cpu.json")
    device = jax.devices()[0]
    checks = _check_defaults() if _CHECK.value else []
    sweep_rows = correctness_sweep(_SMOKE.value)
    summary = {f"correctness_{k}": v for k, v in _sweep_summary(sweep_rows).items()}
    rows, cfg, sweep_log, source = [], {}, [], None
    if not accelerator:
        print(f"\n{jax.default_backend()} backend: the kernels run in interpret mode here, so their "
              "timings are not meaningful and none are taken; the correctness sweep above is the "
              "result. Run on a GPU or TPU for timings.", flush=True)
    if accelerator or _SMOKE.value:
        seq_lens = [int(s) for s in _SEQ_LENS.value]
        kv_heads = [int(s) for s in _KV_HEADS.value]
        cfg, source = default_config(_HEAD_DIM.value, jnp.bfloat16), "default_config"
        if _SWEEP.value and jax.default_backend() == "gpu":
            cfg, sweep_log = _sweep(max(seq_lens), min(kv_heads))
            source = "default_config" if cfg == default_config(_HEAD_DIM.value, jnp.bfloat16) else "sweep"
        print("config:", _flat(cfg), f"({source})", flush=True)
        rows, timing = attention_rows(cfg, seq_lens, kv_heads)
        score, score_summary = score_rows(_SCORE_T.value, tuple(int(x) for x in _SCORE_HEADS.value))
        rows += score
        summary.update(timing, **score_summary)
        if not accelerator:
            summary = {k: v for k, v in summary.items() if k.startswith("correctness_")}
            summary["timings"] = "not meaningful on CPU (interpret mode); see rows for the smoke"

    stats = device.memory_stats() or {}
    write_result(out, "kernels", rows, summary, config=_flat(cfg), config_source=source,
                 default_config=_flat(default_config(_HEAD_DIM.value, jnp.bfloat16)),
                 correctness=sweep_rows,
                 peak_bytes_in_use=stats.get("peak_bytes_in_use"), sweep=sweep_log,
                 check_defaults=checks)
    timed = [r for r in rows if "fwd_ms" in r]
    if timed:
        print(f"\n{'T':>6} {'Hkv':>4} {'impl':<15} {'fwd ms':>8} {'f+b ms':>8} {'f TF/s':>7} "
              f"{'f+b TF/s':>8}")
    for r in timed:
        print(f"{r['seq_len']:>6} {r['kv_heads']:>4} {r['impl']:<15} {r['fwd_ms']:>8.3f} "
              f"{r['fwd_bwd_ms']:>8.3f} {r['fwd_tflops']:>7.1f} {r['fwd_bwd_tflops']:>8.1f}")
    for r in rows:
        if "error" in r or r.get("what") == "block_scores":
            print(r)
    print(json.dumps(summary, indent=1))
    print("device:", device.device_kind, "jax", jax.__version__, "->", out)


if __name__ == "__main__":
    _checks.run(main)
