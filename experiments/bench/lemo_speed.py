"""LeMo vs dense LoRA: wall time of one LoRA fine-tuning train step, side by side in one process.

    python -m experiments.bench.lemo_speed --out bench_results/lemo_speed.json \\
        [--preset=small --seq_lens=2048 --batch_size=1 --reps=10 --attention=auto]
    # On a GPU, 7B shapes (random weights), fewer layers to fit or to go longer:
    python -m experiments.bench.lemo_speed --preset=llama2-7b --n_layers=8 --seq_lens=4096,8192 \\
        --out bench_results/lemo_speed_7b.json

Every step is built as :func:`tokensparse.pipelines.finetune.finetune` builds it
(:func:`tokensparse.train.make_train_step` over :class:`tokensparse.lora.LoRAParam`, AdamW from
``finetune_small.py``) on the *same* model, optimizer and batch; only the loss differs. The rows are
the fair comparison's (:mod:`tokensparse.lemo.comparison`, ``--rows``): ``lora`` (the baseline,
with LeMo's MLP rematerialisation when ``--config.lemo.mlp_mode=recompute``), ``lemo_elimination``
(token elimination with the baseline's MLP: how the paper's artifact times LeMo, and the headline
``step_speedup@<T>``), ``lemo_mlp`` (the channel-sparse MLP backward alone) and ``lemo`` (both;
``step_speedup_channel_sparse@<T>``). Same dtype, remat policy, attention backend and loss segment for
all. Random weights
are fine: the step's work does not depend on their values. Each step is compiled and warmed up,
then timed repetitions rotate the rows' order (ABBA for two), blocking on the loss, the LoRA parameters
and the optimizer state before the clock is read; rows report medians. ``step_speedup@<T>`` is
LoRA time / LeMo time (larger is better). Rows also carry compile-only ``temp_bytes`` (activations)
and, on a GPU, the device's ``peak_bytes_in_use`` after each row's warm-up (cumulative: rows warm up
from the sparsest, ``lemo``, to ``lora``, so the first is its own peak and each later one the max so
far).
Absolute times mean something only on a GPU or TPU; on a CPU read the ratio. ``--dtype=auto`` is
bf16 on accelerators (the spec's recipe) and fp32 on a CPU, whose bf16 dots are far too slow.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
from absl import flags
from flax import nnx

from experiments import _checks, config_dicts, run_configs
from experiments.bench import timing, write_result
from experiments.bench.inputs import random_batch, resolve_dtype, with_placeholder_selector
from experiments.bench.timing import timed_step
from experiments.configs import finetune_small
from tokensparse import attention, lora, train
from tokensparse.config import DTYPES, LeMoConfig, preset, preset_names
from tokensparse.lemo.comparison import ROW_HELP, ROWS, comparison_configs, is_plain_lora
from tokensparse.lemo.forward import check_lemo, group_layers, lemo_loss
from tokensparse.llama import Llama
from tokensparse.metrics import compiled_memory
from tokensparse.remat import REMAT_POLICIES

_PRESET = flags.DEFINE_string("preset", "small", "Model preset (random weights).")
_N_LAYERS = flags.DEFINE_integer("n_layers", 0, "Override the preset's layer count (0: keep it).")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048"], "Sequence lengths.")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Rows per step (LeMo's recipe: 1).")
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions per method (median; at least 5).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per method after compiling.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "Attention backend of both methods.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Parameter and compute dtype of both methods (auto: "
                             "bfloat16 on a GPU or TPU, float32 on a CPU, where bf16 dots are slow).")
_REMAT = flags.DEFINE_string("remat", "none", "Remat policy of both methods.")
_LOSS_SEGMENT = flags.DEFINE_integer("loss_segment", 2048, "LM-head loss segment of both methods.")
_ROWS = flags.DEFINE_list("rows", ["lora", "lemo_elimination", "lemo"], "Rows of the fair "
                          f"comparison to time, from {', '.join(ROWS)} (lora always runs).")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_speed.json", "Where to write the JSON.")
_CONFIG = config_dicts.define_lemo_flags(
    "LeMo's options (LeMoConfig) for the LeMo rows: a fixed schedule (half, all or profile).")

_checks.one_of(_PRESET, preset_names())
_checks.at_least(_N_LAYERS, 0)
_checks.int_list(_SEQ_LENS, multiple_of=LeMoConfig().block_size, why="LeMo keeps whole blocks")
_checks.at_least(_BATCH, 1)
_checks.at_least(_REPS, 1)
_checks.at_least(_WARMUP, 0)
_checks.one_of(_ATTENTION, _checks.attention_backends())
_checks.one_of(_DTYPE, ("auto", *DTYPES))
_checks.one_of(_REMAT, REMAT_POLICIES)
_checks.at_least(_LOSS_SEGMENT, 0)
_checks.one_of(_ROWS, ROWS)


def timed_rows() -> tuple[str, ...]:
    """``--rows`` in report order, the baseline always first."""
    return tuple(m for m in ROWS if m == "lora" or m in _ROWS.value)


def build(seq_len: int, lemo: LeMoConfig):
    """A random-weight preset with LoRA (r=8, α=16 on q,k,v,o) and its LoRA-only AdamW; its layers
    grouped to ``lemo``'s runs (both methods' steps scan over whole groups)."""
    overrides = {"dtype": resolve_dtype(_DTYPE.value), "param_dtype": resolve_dtype(_DTYPE.value)}
    if _N_LAYERS.value:
        overrides["n_layers"] = _N_LAYERS.value
    config = preset(_PRESET.value, **overrides).with_context(seq_len)
    model = Llama(config, attention_backend=_ATTENTION.value, remat=_REMAT.value, rngs=nnx.Rngs(0))
    recipe = run_configs.finetune_config(finetune_small.get_config())
    lora.add_lora(model, recipe.lora, rngs=nnx.Rngs(1))
    with_placeholder_selector(model, lemo)
    group_layers(model, lemo)
    tc = recipe.train.replace(seq_len=seq_len, batch_size=_BATCH.value,
                              loss_segment=_LOSS_SEGMENT.value)
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=lora.LoRAParam)
    return model, optimizer, config


def train_step(row: LeMoConfig):
    """One row's jitted LoRA train step: the same factory for every row, only the forward differs
    (the plain :func:`tokensparse.train.lm_loss` when the row is plain LoRA)."""
    def loss(model, batch):
        if is_plain_lora(row):
            return train.lm_loss(model, batch, loss_segment=_LOSS_SEGMENT.value)
        return lemo_loss(model, batch, lemo=row, loss_segment=_LOSS_SEGMENT.value)

    return train.make_train_step(loss, wrt=lora.LoRAParam)


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure(seq_len: int, lemo: LeMoConfig) -> dict[str, dict]:
    """The timed rows at ``seq_len``: compile-only memory, warm-up, interleaved timing."""
    model, optimizer, config = build(seq_len, lemo)
    check_lemo(model, lemo, seq_len)
    batch = random_batch(config.vocab_size, _BATCH.value, seq_len)
    configs = comparison_configs(lemo)
    steps = {m: train_step(configs[m]) for m in timed_rows()}
    rows = {}
    for method in reversed(timed_rows()):  # sparsest first: the cumulative device peak
        cost = compiled_memory(steps[method], model, optimizer, batch)
        losses = [timed_step(steps[method], model, optimizer, batch)[1]
                  for _ in range(max(_WARMUP.value, 1))]
        rows[method] = {"preset": _PRESET.value, "n_layers": config.n_layers, "seq_len": seq_len,
                        "batch_size": _BATCH.value, "method": method, "dtype": resolve_dtype(_DTYPE.value),
                        "remat": _REMAT.value,
                        "attention": attention.model_backend(_ATTENTION.value, config,
                                                             seq_len=seq_len, batch=_BATCH.value),
                        "mlp_mode": configs[method].mlp_mode,
                        "temp_bytes": cost.temp_bytes, "arg_bytes": cost.argument_bytes,
                        "flops": cost.flops, "warmup_loss": losses[-1],
                        "peak_bytes_after_warmup": peak_bytes()}
    timings = timing.interleaved(
        {m: functools.partial(lambda m: timed_step(steps[m], model, optimizer, batch)[0], m)
         for m in timed_rows()}, max(_REPS.value, 5))
    for method, row in rows.items():
        row["times_s"], row["step_s"] = timings[method]["times_s"], timings[method]["median_s"]
        row["tokens_per_s"] = _BATCH.value * seq_len / row["step_s"]
    return rows


def lemo_config() -> LeMoConfig:
    """``--config.lemo``'s LeMoConfig (errors name the config path)."""
    try:
        lemo = config_dicts.from_dict(LeMoConfig, _CONFIG.value.lemo.to_dict(), "config.lemo")
    except ValueError as e:
        _checks.fail(_checks.flag_for_config_error(str(e)))
    if lemo.schedule not in ("half", "all", "profile"):
        _checks.fail(f"config.lemo.schedule={lemo.schedule!r}: this benchmark times a fixed schedule "
                     "(half, all or profile).")
    return lemo


def main(argv):
    del argv
    _CONFIG.exit_if_help()
    lemo = lemo_config()
    rows, summary = [], {}
    print(f"{'seq_len':>8} {'row':>17} {'step ms':>9} {'tok/s':>9} {'temp MiB':>9}")
    for seq_len in map(int, _SEQ_LENS.value):
        measured = measure(seq_len, lemo)
        for method in timed_rows():
            row = measured[method]
            rows.append(row)
            print(f"{seq_len:>8} {method:>17} {row['step_s'] * 1e3:>9.2f} "
                  f"{row['tokens_per_s']:>9.0f} {row['temp_bytes'] / 2**20:>9.1f}", flush=True)
        for key, method in SPEEDUPS.items():
            if method in measured:
                summary[f"{key}@{seq_len}"] = measured["lora"]["step_s"] / measured[method]["step_s"]
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "lemo_speed", rows, summary, settings={
        "lemo_config": dataclasses.asdict(lemo), "rows": {m: ROW_HELP[m] for m in timed_rows()},
        "lora": "r=8, alpha=16 on q,k,v,o", "optimizer": "AdamW (LoRA only)",
        "reps": max(_REPS.value, 5), "warmup": max(_WARMUP.value, 1),
        "loss_segment": _LOSS_SEGMENT.value, "timing": "median, rotated order, compile excluded"})


# summary key → the row timed against lora
SPEEDUPS = {"step_speedup": "lemo_elimination", "step_speedup_channel_sparse": "lemo",
            "step_speedup_mlp": "lemo_mlp"}


if __name__ == "__main__":
    _checks.run(main)
