"""LeMo vs dense LoRA: wall time of one LoRA fine-tuning train step, side by side in one process.

    python -m experiments.bench.lemo_speed --out bench_results/lemo_speed.json \\
        [--preset=small --seq_lens=2048 --batch_size=1 --reps=10 --attention=auto]
    # On a GPU, 7B shapes (random weights), fewer layers to fit or to go longer:
    python -m experiments.bench.lemo_speed --preset=llama2-7b --n_layers=8 --seq_lens=4096,8192 \\
        --out bench_results/lemo_speed_7b.json

Both steps are built as :func:`tokensparse.pipelines.finetune.finetune` builds them
(:func:`tokensparse.train.make_train_step` over :class:`tokensparse.lora.LoRAParam`, AdamW from
``finetune_small.py``) on the *same* model, optimizer and batch; only the loss differs (dense
:func:`tokensparse.train.lm_loss` vs :func:`tokensparse.lemo.forward.lemo_loss` with the default
LeMoConfig). Same dtype, remat policy, attention backend and loss segment for both. Random weights
are fine: the step's work does not depend on their values. Each step is compiled and warmed up,
then timed repetitions alternate the two (ABBA order), blocking on the loss, the LoRA parameters
and the optimizer state before the clock is read; rows report medians. ``step_speedup@<T>`` is
LoRA time / LeMo time (larger is better). Rows also carry compile-only ``temp_bytes`` (activations)
and, on a GPU, the device's ``peak_bytes_in_use`` after each method's warm-up (cumulative: LeMo is
warmed up first, so its number is its own peak and the LoRA number is the max of both).
Absolute times mean something only on a GPU or TPU; on a CPU read the ratio. ``--dtype=auto`` is
bf16 on accelerators (the spec's recipe) and fp32 on a CPU, whose bf16 dots are far too slow.
"""

from __future__ import annotations

import functools
import json

import jax
from absl import flags
from flax import nnx

from experiments import _checks, run_configs
from experiments.bench import timing, write_result
from experiments.bench.inputs import random_batch, resolve_dtype
from experiments.bench.timing import timed_step
from experiments.configs import finetune_small
from tokensparse import attention, lora, train
from tokensparse.config import DTYPES, LeMoConfig, preset, preset_names
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
_OUT = flags.DEFINE_string("out", "bench_results/lemo_speed.json", "Where to write the JSON.")

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

METHODS = ("lora", "lemo")


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
    group_layers(model, lemo)
    tc = recipe.train.replace(seq_len=seq_len, batch_size=_BATCH.value,
                              loss_segment=_LOSS_SEGMENT.value)
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=lora.LoRAParam)
    return model, optimizer, config


def train_steps(lemo: LeMoConfig) -> dict:
    """Both methods' jitted LoRA train steps: the same factory, only the forward differs."""
    def dense(model, batch):
        return train.lm_loss(model, batch, loss_segment=_LOSS_SEGMENT.value)

    def sparse(model, batch):
        return lemo_loss(model, batch, lemo=lemo, loss_segment=_LOSS_SEGMENT.value)

    return {"lora": train.make_train_step(dense, wrt=lora.LoRAParam),
            "lemo": train.make_train_step(sparse, wrt=lora.LoRAParam)}


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def measure(seq_len: int) -> dict[str, dict]:
    """Rows for both methods at ``seq_len``: compile-only memory, warm-up, interleaved timing."""
    lemo = LeMoConfig()
    model, optimizer, config = build(seq_len, lemo)
    check_lemo(model, lemo, seq_len)
    batch = random_batch(config.vocab_size, _BATCH.value, seq_len)
    steps = train_steps(lemo)
    rows = {}
    for method in ("lemo", "lora"):  # LeMo first: the cumulative device peak is then its own
        cost = compiled_memory(steps[method], model, optimizer, batch)
        losses = [timed_step(steps[method], model, optimizer, batch)[1]
                  for _ in range(max(_WARMUP.value, 1))]
        rows[method] = {"preset": _PRESET.value, "n_layers": config.n_layers, "seq_len": seq_len,
                        "batch_size": _BATCH.value, "method": method, "dtype": resolve_dtype(_DTYPE.value),
                        "remat": _REMAT.value,
                        "attention": attention.model_backend(_ATTENTION.value, config,
                                                             seq_len=seq_len, batch=_BATCH.value),
                        "temp_bytes": cost.temp_bytes, "arg_bytes": cost.argument_bytes,
                        "flops": cost.flops, "warmup_loss": losses[-1],
                        "peak_bytes_after_warmup": peak_bytes()}
    timings = timing.interleaved(
        {m: functools.partial(lambda m: timed_step(steps[m], model, optimizer, batch)[0], m)
         for m in METHODS}, max(_REPS.value, 5))
    for method, row in rows.items():
        row["times_s"], row["step_s"] = timings[method]["times_s"], timings[method]["median_s"]
        row["tokens_per_s"] = _BATCH.value * seq_len / row["step_s"]
    return rows


def main(argv):
    del argv
    rows, summary = [], {}
    print(f"{'seq_len':>8} {'method':>6} {'step ms':>9} {'tok/s':>9} {'temp MiB':>9}")
    for seq_len in map(int, _SEQ_LENS.value):
        pair = measure(seq_len)
        for method in METHODS:
            row = pair[method]
            rows.append(row)
            print(f"{seq_len:>8} {method:>6} {row['step_s'] * 1e3:>9.2f} {row['tokens_per_s']:>9.0f} "
                  f"{row['temp_bytes'] / 2**20:>9.1f}", flush=True)
        summary[f"step_speedup@{seq_len}"] = pair["lora"]["step_s"] / pair["lemo"]["step_s"]
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "lemo_speed", rows, summary, settings={
        "lemo": "default LeMoConfig: keep 0.4 in layers L/2-1..L-2, oracle selection, MLP backward "
        "keeps 20% channels", "lora": "r=8, alpha=16 on q,k,v,o", "optimizer": "AdamW (LoRA only)",
        "reps": max(_REPS.value, 5), "warmup": max(_WARMUP.value, 1),
        "loss_segment": _LOSS_SEGMENT.value, "timing": "median, ABBA-interleaved, compile excluded"})


if __name__ == "__main__":
    _checks.run(main)
