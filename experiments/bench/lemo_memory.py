"""LeMo vs dense LoRA: compile-only activation and total memory of one LoRA training step, split
into LeMo's parts.

    python -m experiments.bench.lemo_memory [--preset=llama2-7b --seq_lens=4096,8192 --out FILE]
    python -m experiments.bench.lemo_memory --config.lemo.mlp_drop=0.5 --remat=none  # LeMo's options
    python -m experiments.bench.lemo_memory --lemo_profile=bench_results/lemo_profile.json  # a profile

Nothing is allocated: the step is lowered on abstract (shape-only) parameters and XLA reports its
buffer assignment, so 7B shapes at 8K work on a CPU. ``temp_bytes`` is activations + workspace;
``arg_bytes`` is parameters + LoRA + batch. Both methods share dtype (bf16), remat policy and the
segmented loss and attention backend (default ``chunked``: no [T, T] matrices, as with a flash
kernel on a GPU); the ratio is LoRA / LeMo (larger is better).

The comparison is fair (:mod:`tokensparse.lemo.comparison`): the LoRA baseline gets the MLP
rematerialisation LeMo uses (``mlp_mode=recompute``), and four rows split the saving: ``lora``,
``lemo_elimination`` (token elimination alone, the baseline's MLP), ``lemo_mlp`` (LeMo's MLP
treatment alone, every layer dense) and ``lemo`` (both). Summary keys: ``activation_ratio@T`` and
``total_ratio@T`` for ``lemo``, ``*_elimination@T`` and ``*_mlp@T`` for the parts; ``_remat_<p>``
before ``@`` for remat policies other than none.

LeMo's options are the fine-tuning config's, ``--config.lemo.*`` (default LeMoConfig: keep 0.4 in
layers L/2-1..L-2, the learned selector, MLP backward drops 80% of channels; ``--config_help`` lists
them). Only fixed schedules have a memory to measure: ``half``, ``all`` and ``profile``
(``--config.lemo.profile="[1.0, 0.5, ...]"`` with ``--config.lemo.schedule=profile``, or the
``"profile"`` of the JSON file ``--lemo_profile``, e.g. the ``lemo_profile.json`` an
``algorithm1`` / ``sensitivity`` fine-tuning run tuned). Any selection rule computed inside the step
can be measured (``--config.lemo.selector``; the learned selector with placeholder weights of its
real shape, which is all memory depends on); not ``predictor``, whose weights come from a run.
"""

from __future__ import annotations

import dataclasses
import json

from absl import flags

from experiments import _checks, config_dicts
from experiments.bench import read_keep_profile, write_result
from experiments.bench.inputs import lowered_lora_step
from tokensparse import attention
from tokensparse.config import LeMoConfig, preset, preset_names
from tokensparse.lemo.comparison import ROW_HELP, ROWS, baseline_mlp_mode, measure_rows
from tokensparse.remat import REMAT_POLICIES

_PRESET = flags.DEFINE_string("preset", "llama2-7b", "Model preset (random weights, shapes only).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Sequence lengths.")
_REMAT = flags.DEFINE_list("remat", ["none", "full"], "Remat policies (each for both methods); the "
                           "summary's unsuffixed keys are for 'none'.")
_ATTENTION = flags.DEFINE_string("attention", "chunked", "Attention backend for both methods "
                                 "(chunked: flash-like memory on any platform).")
_PROFILE = flags.DEFINE_string("lemo_profile", "", "A JSON file with a per-layer keep \"profile\" (e.g. "
                               "the lemo_profile.json Algorithm 1 writes into a fine-tuning workdir): "
                               "LeMo uses it (schedule=profile) instead of the default keep 0.4 in "
                               "layers L/2-1..L-2; instead of --config.lemo.profile.")
_CONFIG = config_dicts.define_lemo_flags(
    "LeMo's options (LeMoConfig, the fine-tuning config's config.lemo) for the LeMo step: "
    "schedule half, all or profile (algorithm1 and sensitivity are tuned during fine-tuning: give "
    "the profile they tune with --lemo_profile); any selector but predictor.")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_memory.json", "Where to write the JSON "
                           "(and its figure, the same path with .png).")

_checks.one_of(_PRESET, preset_names())
_checks.int_list(_SEQ_LENS)  # (multiples of config.lemo.block_size: checked in main)
_checks.one_of(_REMAT, REMAT_POLICIES)
_checks.one_of(_ATTENTION, _checks.attention_backends())
MEASURABLE = ("half", "all", "profile")  # schedules with keep ratios before any fine-tuning


def lemo_config(n_layers: int) -> LeMoConfig:
    """``--config.lemo``'s LeMoConfig, with ``--lemo_profile``'s per-layer keep ratios
    (schedule=profile) when given, checked against an ``n_layers`` model. Errors (ValueError) name
    the config path or the flag."""
    values = _CONFIG.value.lemo.to_dict()
    if _PROFILE.value:
        if values["profile"] is not None:
            raise ValueError("give --lemo_profile (a file) or --config.lemo.profile, not both.")
        if values["schedule"] not in (LeMoConfig().schedule, "profile"):
            raise ValueError(f"config.lemo.schedule={values['schedule']!r}: --lemo_profile gives a "
                             "profile, so the schedule is 'profile' (leave it unset).")
        values["profile"], values["schedule"] = read_keep_profile(_PROFILE.value), "profile"
    lemo = config_dicts.from_dict(LeMoConfig, values, "config.lemo")
    if lemo.schedule not in MEASURABLE:
        raise ValueError(f"config.lemo.schedule={lemo.schedule!r} has no keep ratios until a "
                         f"fine-tuning run tunes them; measure one of {', '.join(MEASURABLE)} (the "
                         "profile it tuned: --lemo_profile=<workdir>/lemo_profile.json).")
    if lemo.selector == "predictor":
        raise ValueError("config.lemo.selector='predictor': this benchmark lowers the step with rules "
                         "computed inside it (the predictors' weights come from a training run).")
    try:
        lemo.keep_ratios(n_layers)
    except ValueError as e:
        source = f"--lemo_profile={_PROFILE.value}" if _PROFILE.value else "config.lemo.profile"
        raise ValueError(f"{source}: {e}") from None
    return lemo


def check_seq_lens(lemo: LeMoConfig) -> None:
    bad = [t for t in map(int, _SEQ_LENS.value) if t % lemo.block_size]
    if bad:
        _checks.fail(f"flag --seq_lens={','.join(_SEQ_LENS.value)}: {bad[0]} must be a multiple of "
                     f"config.lemo.block_size={lemo.block_size} (LeMo keeps whole blocks).")


def describe(lemo: LeMoConfig) -> str:
    """The settings' one-line description of the LeMo step: schedule, selection, MLP backward."""
    if _PROFILE.value:
        schedule = f"profile from {_PROFILE.value}: {list(lemo.profile)}"
    elif lemo.schedule == "profile":
        schedule = f"profile {list(lemo.profile)}"
    elif lemo.schedule == "all":
        schedule = f"keep {lemo.keep_ratio:g} in every layer"
    else:
        schedule = f"keep {lemo.keep_ratio:g} in layers L/2-1..L-2"
    mlp = {"channel_sparse_bwd": f"MLP backward keeps {1 - lemo.mlp_drop:.0%} channels",
           "recompute": "exact MLP backward recomputed from its input",
           "dense": "dense MLP backward"}[lemo.mlp_mode]
    return f"{schedule}, {lemo.selector} selection, {mlp}"


def step_cost(config, seq_len: int, method: str, remat: str, lemo: LeMoConfig) -> dict:
    compiled = lowered_lora_step(config, seq_len, method, lemo=lemo, remat=remat,
                                 attention=_ATTENTION.value).compile()
    mem = compiled.memory_analysis()
    return {"preset": _PRESET.value, "seq_len": seq_len, "method": method, "remat": remat,
            "attention": attention.model_backend(_ATTENTION.value, config, seq_len=seq_len),
            "temp_bytes": int(mem.temp_size_in_bytes), "arg_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes)}


def fair_rows(config, seq_len: int, remat: str, lemo: LeMoConfig) -> dict[str, dict]:
    """Every row of :data:`~tokensparse.lemo.comparison.ROWS` at one length and remat policy; a row
    whose config equals an earlier row's is not compiled again (it says ``same_as``)."""
    return measure_rows(lemo, lambda method: step_cost(config, seq_len, method, remat, lemo))


SPLIT = {"": "lemo", "_elimination": "lemo_elimination", "_mlp": "lemo_mlp"}  # summary key → row


def main(argv):
    del argv
    _CONFIG.exit_if_help()
    config = preset(_PRESET.value, dtype="bfloat16", param_dtype="bfloat16")
    try:
        lemo = lemo_config(config.n_layers)
    except ValueError as e:
        _checks.fail(_checks.flag_for_config_error(str(e)))
    check_seq_lens(lemo)
    rows, summary, ratios = [], {}, lemo.keep_ratios(config.n_layers)
    print(f"{'seq_len':>8} {'remat':>6} {'row':>17} {'temp GiB':>9} {'args GiB':>9}")
    for remat in _REMAT.value:
        suffix = "" if remat == "none" else f"_remat_{remat}"
        for seq_len in map(int, _SEQ_LENS.value):
            by_row = fair_rows(config, seq_len, remat, lemo)
            for row in by_row.values():
                rows.append(row)
                print(f"{seq_len:>8} {remat:>6} {row['method']:>17} "
                      f"{row['temp_bytes'] / 2**30:>9.2f} {row['arg_bytes'] / 2**30:>9.2f}",
                      flush=True)
            total = {m: r["temp_bytes"] + r["arg_bytes"] for m, r in by_row.items()}
            for part, method in SPLIT.items():
                summary[f"activation_ratio{part}{suffix}@{seq_len}"] = (
                    by_row["lora"]["temp_bytes"] / by_row[method]["temp_bytes"])
                summary[f"total_ratio{part}{suffix}@{seq_len}"] = total["lora"] / total[method]
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "lemo_memory", rows, summary, settings={
        "dtype": "bfloat16", "lemo": describe(lemo), "lemo_config": dataclasses.asdict(lemo),
        "rows": {m: ROW_HELP[m] for m in ROWS},
        "baseline_mlp_mode": baseline_mlp_mode(lemo),
        **({"lemo_profile": _PROFILE.value} if _PROFILE.value else {}),
        "mean_keep": sum(ratios) / config.n_layers, "loss_segment": 2048, "batch": 1})


if __name__ == "__main__":
    _checks.run(main)
