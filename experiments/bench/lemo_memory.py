"""LeMo vs dense LoRA: compile-only activation and total memory of one LoRA training step.

    python -m experiments.bench.lemo_memory [--preset=llama2-7b --seq_lens=4096,8192 --out FILE]

Nothing is allocated: the step is lowered on abstract (shape-only) parameters and XLA reports its
buffer assignment, so 7B shapes at 8K work on a CPU. ``temp_bytes`` is activations + workspace;
``arg_bytes`` is parameters + LoRA + batch. Both methods share dtype (bf16), remat policy and the
segmented loss and attention backend (default ``chunked``: no [T, T] matrices, as with a flash
kernel on a GPU); the ratio is LoRA / LeMo (larger is better).
"""

from __future__ import annotations

import json

from absl import flags

from experiments import _checks
from experiments.bench import read_keep_profile, write_result
from experiments.bench.inputs import lowered_lora_step
from tokensparse import attention
from tokensparse.config import LEMO_MLP_MODES, LeMoConfig, preset, preset_names
from tokensparse.remat import REMAT_POLICIES

_PRESET = flags.DEFINE_string("preset", "llama2-7b", "Model preset (random weights, shapes only).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Sequence lengths.")
_REMAT = flags.DEFINE_list("remat", ["none", "full"], "Remat policies (each for both methods); the "
                           "summary's unsuffixed keys are for 'none'.")
_ATTENTION = flags.DEFINE_string("attention", "chunked", "Attention backend for both methods "
                                 "(chunked: flash-like memory on any platform).")
_PROFILE = flags.DEFINE_string("lemo_profile", "", "A JSON file with a per-layer keep \"profile\" (e.g. "
                               "the lemo_profile.json Algorithm 1 writes into a fine-tuning workdir): "
                               "LeMo uses it instead of the default keep 0.4 in layers L/2-1..L-2.")
_MLP_DROP = flags.DEFINE_float("mlp_drop", 0.8, "Fraction of MLP channels LeMo's backward drops "
                               "(LeMoConfig.mlp_drop; spec §4.7 also reports 0.5).")
_MLP_MODE = flags.DEFINE_string("mlp_mode", "channel_sparse_bwd", "LeMo's MLP backward "
                                 "(LeMoConfig.mlp_mode): channel_sparse_bwd (spec), recompute (exact, "
                                 "saves only the MLP input) or dense.")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_memory.json", "Where to write the JSON "
                           "(and its figure, the same path with .png).")

_checks.one_of(_PRESET, preset_names())
_checks.int_list(_SEQ_LENS, multiple_of=LeMoConfig().block_size, why="LeMo keeps whole blocks")
_checks.one_of(_REMAT, REMAT_POLICIES)
_checks.one_of(_ATTENTION, _checks.attention_backends())
flags.register_validator(_MLP_DROP, lambda v: 0.0 <= v < 1.0, "must be in [0, 1).")
_checks.one_of(_MLP_MODE, LEMO_MLP_MODES)


def lemo_config() -> LeMoConfig:
    """The default LeMoConfig, or ``--lemo_profile``'s per-layer keep ratios; ``--mlp_drop``,
    ``--mlp_mode``."""
    mlp = {"mlp_drop": _MLP_DROP.value, "mlp_mode": _MLP_MODE.value}
    if not _PROFILE.value:
        return LeMoConfig(**mlp)
    return LeMoConfig(schedule="profile", profile=read_keep_profile(_PROFILE.value), **mlp)


def step_cost(config, seq_len: int, method: str, remat: str, lemo: LeMoConfig) -> dict:
    compiled = lowered_lora_step(config, seq_len, method, lemo=lemo, remat=remat,
                                 attention=_ATTENTION.value).compile()
    mem = compiled.memory_analysis()
    return {"preset": _PRESET.value, "seq_len": seq_len, "method": method, "remat": remat,
            "attention": attention.model_backend(_ATTENTION.value, config, seq_len=seq_len),
            "temp_bytes": int(mem.temp_size_in_bytes), "arg_bytes": int(mem.argument_size_in_bytes),
            "output_bytes": int(mem.output_size_in_bytes)}


def main(argv):
    del argv
    config = preset(_PRESET.value, dtype="bfloat16", param_dtype="bfloat16")
    rows, summary, lemo = [], {}, lemo_config()
    print(f"{'seq_len':>8} {'remat':>6} {'method':>6} {'temp GiB':>9} {'args GiB':>9}")
    for remat in _REMAT.value:
        suffix = "" if remat == "none" else f"_remat_{remat}"
        for seq_len in map(int, _SEQ_LENS.value):
            pair = {m: step_cost(config, seq_len, m, remat, lemo) for m in ("lora", "lemo")}
            for row in pair.values():
                rows.append(row)
                print(f"{seq_len:>8} {remat:>6} {row['method']:>6} {row['temp_bytes'] / 2**30:>9.2f} "
                      f"{row['arg_bytes'] / 2**30:>9.2f}", flush=True)
            total = {m: r["temp_bytes"] + r["arg_bytes"] for m, r in pair.items()}
            summary[f"activation_ratio{suffix}@{seq_len}"] = (pair["lora"]["temp_bytes"]
                                                             / pair["lemo"]["temp_bytes"])
            summary[f"total_ratio{suffix}@{seq_len}"] = total["lora"] / total["lemo"]
    print(json.dumps(summary, indent=1))
    schedule = (f"profile from {_PROFILE.value}: {list(lemo.profile)}" if _PROFILE.value
                else "keep 0.4 in layers L/2-1..L-2")
    mlp = {"channel_sparse_bwd": f"MLP backward keeps {1 - lemo.mlp_drop:.0%} channels",
           "recompute": "exact MLP backward recomputed from its input",
           "dense": "dense MLP backward"}[lemo.mlp_mode]
    write_result(_OUT.value, "lemo_memory", rows, summary, settings={
        "dtype": "bfloat16", "lemo": f"{schedule}, oracle selection, {mlp}",
        "mean_keep": sum(lemo.keep_ratios(config.n_layers)) / config.n_layers,
        "loss_segment": 2048, "batch": 1})


if __name__ == "__main__":
    _checks.run(main)
