"""SUBLLM vs its dense twin: held-out loss after pretraining both on the same tokens.

    python -m experiments.bench.subllm_quality --out bench_results/subllm_quality.json \\
        [--steps=100 --seq_len=256 --batch_size=12 --workdir=DIR]

Both models are pretrained by :func:`tokensparse.pipelines.pretrain.pretrain` from
``experiments/configs/pretrain_subllm_small.py`` (``config.model = "subllm"`` and ``"dense"``): the
same backbone init, data order, recipe and number of tokens. Runs are cached under ``--workdir``
(default ``<cache>/bench/subllm_quality/<settings>``) and resume when interrupted. The SUBLLM is
evaluated in threshold mode (the causal inference rule; the spec's quality protocol) and in
deterministic top-k mode; ``val_loss_ratio`` = SUBLLM threshold-mode loss / dense loss (lower is
better, ≤ 1.02 is the acceptance bar) and ``val_loss_ratio_topk`` the same in top-k mode. Rows also
carry each run's training throughput, its ``loss_history`` (training loss per logged step, from its
``metrics.jsonl``; drawn as the loss curves ``<out>.png``) and the SUBLLM's score statistics
(fraction of positive scores per subsampler: the Balancer's band is keep ± 0.05; threshold-mode keep
rates; bypass scales). ``--config.subllm.<option>`` sets the SUBLLM's options
(``balancer_statistic``, ``balancer_margin``, ``balancer_start_scale``, ``balancer_start_steps``,
``bypass_init``, ``scorer_warmup``, ``schedule_step_multiplier``, ``weight_attn_bias``, ``init``, ...;
unset: the preset's, which are the spec's; ``--config_help`` lists them;
:mod:`experiments.bench.subllm_options`); the dense twin's run is shared. ``init`` draws both models'
weights, so it names the runs' directory (``-init<scheme>``; the runs made before the option existed
used ``backbone`` and keep their names).
"""

from __future__ import annotations

import json
import pathlib

from absl import flags

from experiments import _checks, run_configs
from experiments.bench import loss_history, subllm_options, write_result
from experiments.configs import pretrain_subllm_small
from tokensparse import data
from tokensparse.pipelines import pretrain
from tokensparse.subllm.structure import subllm_preset_names

_STEPS = flags.DEFINE_integer("steps", 100, "Pretraining steps of each model.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Packed row length.")
_BATCH = flags.DEFINE_integer("batch_size", 12, "Rows per step.")
_LR = flags.DEFINE_float("lr", 2e-3, "Peak learning rate of both.")
_PRESET = flags.DEFINE_string("preset", "subllm-small", "SUBLLM preset.")
_OPTIONS = subllm_options.define()
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 16, "Held-out batches evaluated.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where the two runs live (default: a cache dir).")
_OUT = flags.DEFINE_string("out", "bench_results/subllm_quality.json", "Where to write the JSON "
                           "(and the loss curves, the same path with .png).")

_checks.at_least(_STEPS, 1)
_checks.at_least(_SEQ_LEN, 2)
_checks.at_least(_BATCH, 1)
_checks.at_least(_EVAL_BATCHES, 1)
_checks.in_range(_LR, 0.0, float("inf"))
_checks.one_of(_PRESET, subllm_preset_names())

MODELS = ("dense", "subllm")


def settings() -> dict:
    return {"preset": _PRESET.value, "steps": _STEPS.value, "seq_len": _SEQ_LEN.value,
            "batch_size": _BATCH.value, "lr": _LR.value, "eval_batches": _EVAL_BATCHES.value,
            **subllm_options.values(_PRESET.value)}


def workdir(kind: str = "") -> pathlib.Path:
    """The runs' directory; with ``kind``, that model's run. The dense twin has no Balancer or bypass,
    so its run is shared by every setting of the SUBLLM options (:mod:`subllm_options`)."""
    if _WORKDIR.value:
        root = pathlib.Path(_WORKDIR.value)
    else:
        s = settings()
        name = (f"{s['preset']}-T{s['seq_len']}-s{s['steps']}-b{s['batch_size']}-lr{s['lr']:g}"
                f"-m{s['schedule_step_multiplier']:g}")
        if s["init"] != "backbone":  # both models' init; the older runs (backbone) keep their names
            name += f"-init{s['init']}"
        root = data.cache_dir() / "bench" / "subllm_quality" / name
    if not kind:
        return root
    changed = subllm_options.changed(_PRESET.value)
    if kind == "subllm" and changed:  # the preset's own run keeps its plain name
        return root / subllm_run_name(subllm_options.values(_PRESET.value), changed)
    return root / kind


def subllm_run_name(options: dict, changed: dict) -> str:
    """``subllm-<statistic>-c<bypass_init>``, then ``-m<margin>``, ``-s<start_scale>x<start_steps>``,
    ``-nowarmup`` and ``-<option><value>`` for any other option, when those are changed (the older
    runs' names stay valid)."""
    name = f"subllm-{options['balancer_statistic']}-c{options['bypass_init']:g}"
    if "balancer_margin" in changed:
        name += f"-m{options['balancer_margin']:g}"
    if {"balancer_start_scale", "balancer_start_steps"} & set(changed):
        name += f"-s{options['balancer_start_scale']:g}x{options['balancer_start_steps']}"
    if "scorer_warmup" in changed:
        name += "-nowarmup"  # the preset warms it up
    named = {"balancer_statistic", "bypass_init", "balancer_margin", "balancer_start_scale",
             "balancer_start_steps", "scorer_warmup", "init"}  # init names the root (both models)
    for option, value in sorted(changed.items()):
        if option not in named:
            name += f"-{option}{_short(value)}"
    return name


def _short(value) -> str:
    if isinstance(value, tuple | list):
        return "-".join(_short(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def config(kind: str):
    c = pretrain_subllm_small.get_config()
    c.model = kind
    c.subllm = run_configs.subllm_dict(_PRESET.value,
                                        overrides={"max_positions": max(_SEQ_LEN.value, 2048)})
    subllm_options.apply(c)
    c.train.steps, c.train.seq_len, c.train.batch_size = _STEPS.value, _SEQ_LEN.value, _BATCH.value
    c.train.lr, c.train.eval_batches = _LR.value, _EVAL_BATCHES.value
    c.train.warmup_steps = max(_STEPS.value // 10, 1)
    c.train.checkpoint_every = max(_STEPS.value // 4, 1)
    c.train.eval_every = 0  # only at the end: evaluation costs steps on a CPU
    c.progress = True  # minutes per model on a CPU: step, loss, tokens/s and ETA on stderr
    return c


def run(kind: str) -> dict:
    d = workdir(kind)
    done = d / "summary.json"
    if done.exists() and json.loads(done.read_text()).get("steps") == _STEPS.value:
        print(f"reusing {d}")
        return json.loads(done.read_text())
    print(f"pretraining {kind} into {d}", flush=True)
    return pretrain.pretrain(run_configs.pretrain_config(config(kind)), d)


def main(argv):
    del argv
    _OPTIONS.exit_if_help()
    try:
        for kind in MODELS:
            pretrain.check(run_configs.pretrain_config(config(kind)))
    except ValueError as e:
        _checks.fail(_checks.flag_for_config_error(str(e)))
    summaries = {kind: run(kind) for kind in MODELS}
    dense, sub = summaries["dense"], summaries["subllm"]
    tokens = _STEPS.value * _BATCH.value * _SEQ_LEN.value
    rows = [{"model": kind, **settings(), "train_tokens": tokens, **summaries[kind],
             "loss_history": loss_history(workdir(kind))} for kind in MODELS]
    summary = {"val_loss_ratio": sub["val_loss"] / dense["val_loss"],
               "val_loss_ratio_topk": sub["val_topk_loss"] / dense["val_loss"],
               "dense_val_loss": dense["val_loss"], "subllm_val_loss": sub["val_loss"],
               "subllm_val_topk_loss": sub["val_topk_loss"],
               "pretrain_tokens_per_s_ratio": sub["tokens_per_s"] / dense["tokens_per_s"],
               **{f"subllm_{k}": v for k, v in sub.get("subllm", {}).items()}}
    print(json.dumps(summary, indent=1))
    write_result(_OUT.value, "subllm_quality", rows, summary, settings=settings(),
                 workdir=str(workdir()))


if __name__ == "__main__":
    _checks.run(main)
