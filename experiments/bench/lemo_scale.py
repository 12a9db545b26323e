"""LeMo vs LoRA at scale, compile-only: memory, FLOPs and where the FLOPs go, 8K to 64K.

    python -m experiments.bench.lemo_scale [--preset=llama2-7b,llama3-8b \
        --seq_lens=8192,16384,32768,65536 --remat=none,full --out FILE]
    python -m experiments.bench.lemo_scale --config.lemo.selector=recent   # another selection rule

Every row of the fair comparison (:mod:`tokensparse.lemo.comparison`: ``lora``,
``lemo_elimination``, ``lemo_mlp``, ``lemo``) is lowered as one LoRA gradient step on abstract
parameters (:func:`experiments.bench.inputs.lowered_lora_step`: bf16, LoRA r=8 on q, k, v, o,
``chunked`` attention, loss segments of 2048, batch 1, the same remat policy for every row) and
compiled; nothing is allocated, as in ``lemo_memory``. A row whose config equals an earlier row's
(e.g. ``lemo_mlp`` and ``lora`` with ``mlp_mode=dense`` or ``recompute``) is not compiled again
(``same_as``). Per row:

- ``temp_bytes`` (activations + workspace), ``arg_bytes`` (weights, LoRA, batch) and
  ``total_bytes`` = temp + args, from XLA's buffer assignment;
- ``flops``: matmul FLOPs of the compiled step with every loop iteration counted
  (:func:`tokensparse.flops.categorised_flops`), split by category: ``projections`` (q, k, v, o
  with LoRA), ``attention`` (the core), ``mlp``, ``selection`` (choosing the kept blocks),
  ``head`` (LM head and loss), ``other``;
- ``flops_causal``: the same with the attention tiles that chunked attention skips under a
  causal mask (``lax.cond``, counted whole in ``flops``) at half: an estimate of the work a run
  does, where ``flops`` is what the compiled program may do;
- ratios to the ``lora`` row of the same preset, length and remat.

The summary's unqualified keys are for **the goal row**: the first
``--preset`` (default ``llama2-7b``), ``lemo_elimination`` (token elimination alone, the
baseline's MLP) against ``lora``, remat ``full``: ``flops_ratio@T`` (compiled FLOPs, LoRA /
LeMo), ``flops_ratio_causal@T``, ``activation_ratio@T``, ``total_ratio@T``,
``selection_share@T`` (selection's part of LeMo's FLOPs), ``flops_ratio_free_selection@T`` (the
ratio were selection free) and the analytic ceilings ``analytic_ceiling@T`` /
``analytic_ceiling_causal@T`` (:func:`analytic_flops`: the layers LeMo makes sparse at their
keep ratio, selection free, every tile / causal half; eliminated blocks passed through, so compare
it with a run of ``--config.lemo.eliminated=pass``: the default fill adds the eliminated rows'
projections and a 128-key attention, :mod:`tokensparse.lemo.fill`).

``max_seq_len_80gib_<row>``: the largest multiple of 4096 whose total bytes fit 80 GiB on one
device (``--budget_gib``), for the first preset and remat ``full`` (``_remat_<p>`` for other
policies, ``_<preset>`` for other presets). Found by fitting a quadratic in T (least squares; a
line with two lengths) to the measured total bytes and solving it on multiples of 4096, then,
with ``--verify_max`` (default; the first preset's only), by compiling the step at that length
and at 4096 more and walking 4096 at a time until the first fits and the second does not
(``verified`` in ``max_seq_len``).
``max_seq_len_16gib_fsdp8_estimated_<row>`` is **estimated, not measured**: per chip
arguments / 8 + temp (fsdp over 8 chips splits weights, not a batch of 1's activations), i.e.
assuming weights are gathered per layer and not kept (``sharded_memory`` measures the real
sharded step).
"""

from __future__ import annotations

import dataclasses
import json
import time

from absl import flags

from experiments import _checks, config_dicts
from experiments.bench import write_result
from experiments.bench.inputs import lowered_lora_step
from experiments.bench.scaling import STEP, analytic_flops, fitted_max, verify_max
from tokensparse import attention
from tokensparse.config import LeMoConfig, ModelConfig, preset, preset_names
from tokensparse.flops import categorised_flops
from tokensparse.lemo.comparison import ROW_HELP, ROWS, comparison_configs, measure_rows
from tokensparse.remat import REMAT_POLICIES

_PRESET = flags.DEFINE_list("preset", ["llama2-7b", "llama3-8b"], "Model presets (random weights, "
                            "shapes only).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["8192", "16384", "32768", "65536"], "Sequence lengths.")
_REMAT = flags.DEFINE_list("remat", ["none", "full"], "Remat policies (each for every row).")
_ATTENTION = flags.DEFINE_string("attention", "chunked", "Attention backend for every row "
                                 "(chunked: flash-like memory on any platform).")
_BUDGET = flags.DEFINE_float("budget_gib", 80.0, "One device's memory for max_seq_len_80gib_*.")
_CHIP = flags.DEFINE_float("fsdp_chip_gib", 16.0, "Per-chip memory for the fsdp estimate.")
_CHIPS = flags.DEFINE_integer("fsdp_chips", 8, "Chips the fsdp estimate splits the weights over.")
_VERIFY = flags.DEFINE_bool("verify_max", True, "Confirm the first preset's fitted one-device "
                            "maximum lengths by compiling there (and 4096 further); the other "
                            "presets' are the fit's.")
_CACHE = flags.DEFINE_string("cache_dir", "", "If set, JAX's persistent compilation cache lives "
                             "here, so a rerun (e.g. with another selector) recompiles only what "
                             "changed.")
_CONFIG = config_dicts.define_lemo_flags(
    "LeMo's options (LeMoConfig) for the LeMo rows: schedule half, all or profile, any selection "
    "rule but predictor (its trained modules are not in the compile-only step).")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_scale.json", "Where to write the JSON (and "
                           "its figure, the same path with .png).")

_checks.one_of(_PRESET, preset_names())
_checks.int_list(_SEQ_LENS)
_checks.one_of(_REMAT, REMAT_POLICIES)
_checks.one_of(_ATTENTION, _checks.attention_backends())
_checks.at_least(_CHIPS, 1)

GIB = 2**30
GOAL = {"method": "lemo_elimination", "remat": "full"}  # on the first --preset
MEASURABLE = ("half", "all", "profile")


def lemo_config() -> LeMoConfig:
    """``--config.lemo``'s LeMoConfig; ValueError (naming the config path) for what cannot be
    measured compile-only."""
    lemo = config_dicts.from_dict(LeMoConfig, _CONFIG.value.lemo.to_dict(), "config.lemo")
    if lemo.schedule not in MEASURABLE:
        raise ValueError(f"config.lemo.schedule={lemo.schedule!r} has no keep ratios before "
                         f"fine-tuning; use one of {', '.join(MEASURABLE)}.")
    if lemo.selector == "predictor":
        raise ValueError("config.lemo.selector='predictor' needs trained predictor modules, which "
                         "the compile-only step does not build; choose another rule.")
    return lemo


# -- measuring --------------------------------------------------------------------------------------

def step_cost(config, name: str, seq_len: int, method: str, remat: str, lemo: LeMoConfig) -> dict:
    """Compile one row's LoRA step: bytes, categorised FLOPs, compile seconds."""
    start = time.perf_counter()
    compiled = lowered_lora_step(config, seq_len, method, lemo=lemo, remat=remat,
                                 attention=_ATTENTION.value).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    flops = categorised_flops(compiled)
    temp, args = int(mem.temp_size_in_bytes), int(mem.argument_size_in_bytes)
    skippable = flops.conditional["attention"]
    return {"preset": name, "seq_len": seq_len, "method": method, "remat": remat,
            "attention": attention.model_backend(_ATTENTION.value, config, seq_len=seq_len),
            "temp_bytes": temp, "arg_bytes": args, "output_bytes": int(mem.output_size_in_bytes),
            "total_bytes": temp + args, "flops": flops.total,
            "flops_causal": flops.total - 0.5 * skippable,
            "flops_by_category": flops.by_category,
            "flops_in_conditionals": {c: v for c, v in flops.conditional.items() if v},
            "compile_s": round(seconds, 1)}


def fair_rows(config, name: str, seq_len: int, remat: str, lemo: LeMoConfig) -> dict[str, dict]:
    """Every row of :data:`ROWS` at one length and policy; a row whose config equals an earlier
    row's is copied (``same_as``), not compiled again. Ratios are LoRA / row."""
    rows = measure_rows(lemo, lambda method: step_cost(config, name, seq_len, method, remat, lemo))
    base = rows["lora"]
    for row in rows.values():
        row["flops_ratio"] = base["flops"] / row["flops"]
        row["flops_ratio_causal"] = base["flops_causal"] / row["flops_causal"]
        row["activation_ratio"] = base["temp_bytes"] / row["temp_bytes"]
        row["total_ratio"] = base["total_bytes"] / row["total_bytes"]
    return rows


def _key_suffix(name: str, remat: str) -> str:
    return ("" if remat == GOAL["remat"] else f"_remat_{remat}") + (
        "" if name == _PRESET.value[0] else f"_{name}")


def max_lengths(configs: dict, rows: list, lemo: LeMoConfig) -> tuple[dict, list]:
    """Summary keys of the largest lengths that fit, and the details (fit, verified) per case."""
    summary, details, budget = {}, [], _BUDGET.value * GIB
    for name in _PRESET.value:
        for remat in _REMAT.value:
            for method in ROWS:
                mine = sorted((r for r in rows if (r["preset"], r["remat"], r["method"])
                               == (name, remat, method)), key=lambda r: r["seq_len"])
                lengths = [r["seq_len"] for r in mine]
                one = fitted_max(lengths, [r["total_bytes"] for r in mine], budget)
                chip = fitted_max(lengths, [r["arg_bytes"] / _CHIPS.value + r["temp_bytes"]
                                            for r in mine], _CHIP.value * GIB)
                detail = {"preset": name, "remat": remat, "method": method, "fit_80gib": one,
                          "fsdp_estimated": chip}
                twin = next((d for d in details if (d["preset"], d["remat"]) == (name, remat)
                             and comparison_configs(lemo)[d["method"]]
                             == comparison_configs(lemo)[method]), None)
                if twin:
                    detail.update({k: twin[k] for k in ("one_device", "verified") if k in twin})
                elif _VERIFY.value and name == _PRESET.value[0]:
                    def fits(t, name=name, remat=remat, method=method):
                        compiled = lowered_lora_step(configs[name], t, method, lemo=lemo,
                                                     remat=remat,
                                                     attention=_ATTENTION.value).compile()
                        mem = compiled.memory_analysis()
                        total = mem.temp_size_in_bytes + mem.argument_size_in_bytes
                        print(f"  max length {name} {remat} {method} T={t}: "
                              f"{total / GIB:.2f} GiB", flush=True)
                        return total <= budget
                    detail["one_device"], detail["verified"] = verify_max(fits, one)
                detail.setdefault("one_device", one)
                details.append(detail)
                suffix = _key_suffix(name, remat)
                summary[f"max_seq_len_80gib_{method}{suffix}"] = detail["one_device"]
                summary[f"max_seq_len_16gib_fsdp8_estimated_{method}{suffix}"] = chip
    return summary, details


def goal_summary(rows: list, config: ModelConfig, lemo: LeMoConfig) -> dict:
    """The goal row's keys (module docstring), for the lengths measured with its preset and remat."""
    out = {}
    ratios = lemo.keep_ratios(config.n_layers)
    for seq_len in map(int, _SEQ_LENS.value):
        at = {r["method"]: r for r in rows if r["seq_len"] == seq_len
              and (r["preset"], r["remat"]) == (_PRESET.value[0], GOAL["remat"])}
        if not at:
            continue
        base, goal = at["lora"], at[GOAL["method"]]
        selection = goal["flops_by_category"]["selection"]
        out[f"flops_ratio@{seq_len}"] = goal["flops_ratio"]
        out[f"flops_ratio_causal@{seq_len}"] = goal["flops_ratio_causal"]
        out[f"activation_ratio@{seq_len}"] = goal["activation_ratio"]
        out[f"total_ratio@{seq_len}"] = goal["total_ratio"]
        out[f"selection_share@{seq_len}"] = selection / goal["flops"]
        out[f"flops_ratio_free_selection@{seq_len}"] = base["flops"] / (goal["flops"] - selection)
        for causal, key in ((False, "analytic_ceiling"), (True, "analytic_ceiling_causal")):
            dense = analytic_flops(config, seq_len, (1.0,) * config.n_layers, GOAL["remat"],
                                   causal=causal, block_size=lemo.block_size)
            sparse = analytic_flops(config, seq_len, ratios, GOAL["remat"], causal=causal,
                                    block_size=lemo.block_size)
            out[f"{key}@{seq_len}"] = sum(dense.values()) / sum(sparse.values())
    return out


def main(argv):
    del argv
    _CONFIG.exit_if_help()
    try:
        lemo = lemo_config()
    except ValueError as e:
        _checks.fail(_checks.flag_for_config_error(str(e)))
    bad = [t for t in map(int, _SEQ_LENS.value) if t % lemo.block_size]
    if bad:
        _checks.fail(f"flag --seq_lens={','.join(_SEQ_LENS.value)}: {bad[0]} must be a multiple of "
                     f"config.lemo.block_size={lemo.block_size} (LeMo keeps whole blocks).")
    if _CACHE.value:
        import jax

        jax.config.update("jax_compilation_cache_dir", _CACHE.value)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    start, cpu = time.perf_counter(), time.process_time()
    configs = {n: preset(n, dtype="bfloat16", param_dtype="bfloat16") for n in _PRESET.value}
    rows = []
    print(f"{'preset':>10} {'seq_len':>7} {'remat':>5} {'row':>16} {'temp GiB':>8} {'total GiB':>9} "
          f"{'TFLOP':>8} {'ratio':>6} {'select %':>8} {'compile s':>9}")
    for name, config in configs.items():
        for remat in _REMAT.value:
            for seq_len in map(int, _SEQ_LENS.value):
                for row in fair_rows(config, name, seq_len, remat, lemo).values():
                    rows.append(row)
                    share = 100 * row["flops_by_category"]["selection"] / row["flops"]
                    print(f"{name:>10} {seq_len:>7} {remat:>5} {row['method']:>16} "
                          f"{row['temp_bytes'] / GIB:>8.2f} {row['total_bytes'] / GIB:>9.2f} "
                          f"{row['flops'] / 1e12:>8.1f} {row['flops_ratio']:>6.3f} {share:>8.1f} "
                          f"{row.get('compile_s', '-'):>9}", flush=True)
    summary = goal_summary(rows, configs[_PRESET.value[0]], lemo)
    lengths, details = max_lengths(configs, rows, lemo)
    summary.update(lengths)
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "lemo_scale", rows, summary, max_seq_len=details, settings={
        "dtype": "bfloat16", "batch": 1, "loss_segment": 2048, "attention": _ATTENTION.value,
        "lora": "r=8 on q, k, v, o", "lemo_config": dataclasses.asdict(lemo),
        "mean_keep": {n: sum(lemo.keep_ratios(c.n_layers)) / c.n_layers for n, c in configs.items()},
        "rows": {m: ROW_HELP[m] for m in ROWS},
        "goal_row": {"preset": _PRESET.value[0], **GOAL},
        "flops": "matmul FLOPs of the compiled step, every loop iteration counted, each "
                 "conditional at its largest branch (chunked attention's causally skipped tiles "
                 "count whole); flops_causal counts those tiles at half",
        "flops_categories": "by the Python call stack XLA keeps with each matmul "
                            "(tokensparse.flops.CATEGORY_RULES)",
        "analytic_ceiling": "analytic_flops: the layers LeMo makes sparse at their keep ratio, "
                            "selection free; LoRA / LeMo for the goal row's model and remat",
        "max_seq_len": f"one device: largest multiple of {STEP} with temp + args <= "
                       f"{_BUDGET.value:g} GiB, from a least-squares quadratic in T through the "
                       "measured lengths, solved on multiples of 4096"
                       + (f"; for {_PRESET.value[0]}, then confirmed by compiling there and 4096 "
                          "further (walking 4096 at a time; 'verified' in max_seq_len)"
                          if _VERIFY.value else ""),
        "fsdp": f"ESTIMATED, not measured: per chip args/{_CHIPS.value} + temp <= "
                f"{_CHIP.value:g} GiB (weights split over {_CHIPS.value} chips, a batch of 1's "
                "activations not), same fit; assumes weights are gathered per layer and not "
                "kept for the backward (sharded_memory measures the real step)",
        "wall_s": round(time.perf_counter() - start), "cpu_s": round(time.process_time() - cpu)})


if __name__ == "__main__":
    _checks.run(main)
