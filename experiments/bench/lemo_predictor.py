"""LeMo predictors: held-out recall of the oracle's kept blocks, pruning, and their step-time cost.

    python -m experiments.bench.lemo_predictor --out bench_results/lemo_predictor.json \\
        [--preset=small --base_seq_len=512 --base_steps=400 --config.predictors.seq_len=2048 \\
         --config.predictors.steps=800]
    python -m experiments.bench.lemo_predictor --smoke --out /tmp/lemo_predictor.json  # tiny
    python -m experiments.bench.lemo_predictor --base=smollm2-135m --config.predictors.steps=400 \\
        --config.predictors.train_windows=64 --config.predictors.eval_windows=8 --reps=3 \\
        --out bench_results/lemo_predictor_smollm2.json  # a real base

1. **Base**: the same cached base as ``lemo_quality`` (pretrained at ``--base_seq_len``), or with
   ``--base`` a real pretrained model (a :mod:`tokensparse.zoo` name or anything
   :func:`tokensparse.pipelines.base.load_base` takes), with its own tokenizer; nothing is pretrained then.
2. **Predictors**: ``experiments.train_predictors`` with ``predictors_small.py``'s recipe, whose
   training section is ``--config.predictors.*`` (every PredictorTrainConfig field; ``--config_help``
   lists them): at ``seq_len`` 2048 with RoPE scaling, 800 ``steps``, elastic pruning, the ``column``
   loss, ``lr`` 3e-4; reused when that run finished before with the same training settings (a workdir
   trained otherwise is an error). E.g. ``weight_decay``, ``h2`` and ``sparse_only`` (predictors for
   the sparse layers only) change the training; the collected targets live on disk
   (``targets_dir``, default in the workdir). Runs shorter than 100 steps prune twice (at half the
   steps) unless ``prune_every`` / ``prune_until`` are given.
   Rows per layer: held-out recall@0.4 (``|TopK(ĉ) ∩ TopK(c)| / K``) and Spearman of ĉ with the
   oracle's column scores c, on ``eval_windows`` validation windows.
3. **Overhead**: one LeMo LoRA step (default LeMoConfig at the predictors' ``block_size``, the
   base's weights, batch 1, ``seq_len``)
   with predictor selection, against the same step with a *fixed* selection of the same capacity
   (no selection cost; the attention and MLP work is identical), and with oracle selection;
   timed interleaved in one process, medians. ``overhead_ratio`` = predictor / fixed,
   ``oracle_overhead_ratio`` = oracle / fixed.

Summary: ``mean_recall@0.4`` (over the default schedule's sparse layers), ``mean_spearman``,
``params_kept_ratio`` (after / before pruning), ``overhead_ratio``, ``oracle_overhead_ratio``.
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from flax import nnx
from ml_collections import config_dict
from ml_collections.config_flags import config_flags

from experiments import _checks, config_dicts, run_configs
from experiments.bench import bases, timing, write_result
from experiments.configs import finetune_small, predictors_small
from tokensparse import data, lora, train
from tokensparse.config import LeMoConfig, preset_names
from tokensparse.lemo import predictor, scoring
from tokensparse.lemo.forward import lemo_loss
from tokensparse.lemo.predictor_training import PredictorTrainConfig
from tokensparse.pipelines import base as bases_lib
from tokensparse.pipelines import predictors as predictors_lib

_PRESET = flags.DEFINE_string("preset", "small", "Model preset of the base.")
_BASE_SEQ_LEN = flags.DEFINE_integer("base_seq_len", 512, "The base's pretraining context.")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 400, "The base's pretraining steps.")
_BASE_BATCH = flags.DEFINE_integer("base_batch_size", 8, "The base's pretraining batch size.")
_BASE_WORKDIR = flags.DEFINE_string(
    "base_workdir", None, "Pretraining workdir of the base, reused if it holds summary.json, else "
    "pretrained there (default: the lemo_quality cache, <cache>/bench/lemo_quality/<preset>-T...).")
_BASE = flags.DEFINE_string(
    "base", "", "A real pretrained base instead of pretraining --preset: a tokensparse.zoo name "
    "(e.g. smollm2-135m) or a directory tokensparse.pipelines.base.load_base accepts.")
_CONFIG = config_dicts.define_config_flags(
    config_dict.ConfigDict({"predictors": predictors_small.get_config().train}),
    lambda path: run_configs.field_help("train_predictors",
                                        "train." + path.removeprefix("predictors.")),
    "How the predictors are trained (PredictorTrainConfig: predictors_small.py's config.train, "
    "the recipe of experiments.train_predictors); --smoke replaces seq_len, steps, train_windows "
    "and eval_windows unless given.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Predictor run directory (default: "
                               "<cache>/bench/lemo_predictor/<base>-T<seq_len>-s<steps>-..., named "
                               "after config.predictors); reused when finished, resumed when "
                               "interrupted.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions per variant (median; at least 3).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny preset, few steps, short context (tests); flags "
                           "and --config.predictors.* given explicitly still win.")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_predictor.json", "Where to write the JSON "
                           "(and its per-layer figure, the same path with .png).")

_checks.one_of(_PRESET, preset_names())
_checks.at_least(_BASE_SEQ_LEN, 2)
_checks.at_least(_BASE_STEPS, 1)
_checks.at_least(_BASE_BATCH, 1)
_checks.at_least(_REPS, 1)

SMOKE = {"preset": "tiny", "base_seq_len": 128, "base_steps": 8, "base_batch_size": 4, "reps": 3,
         "predictors.seq_len": 256, "predictors.steps": 12, "predictors.train_windows": 4,
         "predictors.eval_windows": 2}
_FLAGS = {"preset": _PRESET, "base_seq_len": _BASE_SEQ_LEN, "base_steps": _BASE_STEPS,
          "base_batch_size": _BASE_BATCH, "reps": _REPS}
# PredictorTrainConfig fields the result's settings name at their top level (as the flags did).
SETTINGS = ("seq_len", "steps", "train_windows", "eval_windows", "loss", "lr", "weight_decay", "h2",
            "sparse_only", "targets_dir", "block_size")
VARIANTS = ("predictor", "fixed", "oracle")


def log(message: str) -> None:
    print(f"[lemo_predictor] {message}", flush=True)


def overridden() -> set[str]:
    """The ``--config.predictors.*`` fields given on the command line (``predictors.steps``)."""
    return set(config_flags.get_override_values(flags.FLAGS["config"]))


def training() -> PredictorTrainConfig:
    """``--config.predictors``, with ``--smoke`` replacing the values not given explicitly and short
    runs pruning twice; errors (ValueError) name the config path."""
    values, given = _CONFIG.value.predictors.to_dict(), overridden()
    for path, value in SMOKE.items():
        if _SMOKE.value and path.startswith("predictors.") and path not in given:
            values[path.removeprefix("predictors.")] = value
    if not {"predictors.prune_every", "predictors.prune_until"} & given and values["steps"] < 100:
        values["prune_every"], values["prune_until"] = max(values["steps"] // 2, 1), values["steps"]
    tc = config_dicts.from_dict(PredictorTrainConfig, values, "config.predictors")
    for name in ("steps", "eval_windows"):  # (0 is a valid PredictorTrainConfig, not a benchmark)
        if getattr(tc, name) < 1:
            raise ValueError(f"config.predictors.{name}={getattr(tc, name)} must be >= 1.")
    return tc


def settings(tc: PredictorTrainConfig) -> dict:
    """Flag values, with ``--smoke`` replacing the defaults of unset flags, and ``tc``'s
    :data:`SETTINGS`. With ``--base`` the pretraining settings are left out: they describe nothing
    about a base not pretrained here."""
    out = {name: (SMOKE[name] if _SMOKE.value and not flags.FLAGS[name].present else flag.value)
           for name, flag in _FLAGS.items()}
    out.update({name: getattr(tc, name) for name in SETTINGS}, base=_BASE.value)
    if out["base"]:
        for name in ("preset", "base_seq_len", "base_steps", "base_batch_size"):
            del out[name]
    else:
        out["vocab_size"] = 512 if out["preset"] == "tiny" else 8192
    return out


def predictor_config(s: dict, tc: PredictorTrainConfig, base: pathlib.Path | str):
    c = predictors_small.get_config()
    c.base, c.progress = str(base), True
    if "vocab_size" in s:  # a pretrained-here base: the corpus BPE of that size
        c.data.vocab_size = s["vocab_size"]
    c.train = config_dicts.section(tc)
    return c


def run_name(base_name: str, tc: PredictorTrainConfig) -> str:
    """The default predictor workdir's name: the base, then the training settings that tell runs
    apart (any field changed from the benchmark's recipe beyond the named ones is appended)."""
    name = (f"{base_name}-T{tc.seq_len}-s{tc.steps}-w{tc.train_windows}-{tc.loss}-lr{tc.lr:g}"
            + (f"-wd{tc.weight_decay:g}" if tc.weight_decay else "")
            + (f"-h2_{tc.h2}" if tc.h2 else "") + ("-sparse" if tc.sparse_only else ""))
    recipe, given = predictors_small.get_config().train, overridden()
    for field in ("b1", "b2", "warmup_steps", "target_scale", "h1", "layers", "block_size",
                  "prune_every", "prune_until", "prune_start_tau", "prune_tau_step", "keep_ratio",
                  "seed"):
        value = getattr(tc, field)
        if f"predictors.{field}" in given and value != recipe[field]:
            shown = "_".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}"
            name += f"-{field}_{shown}"
    return name


def train_or_load(s: dict, tc: PredictorTrainConfig, base: pathlib.Path | str,
                  workdir: pathlib.Path) -> dict:
    c = predictor_config(s, tc, base)
    done = workdir / "summary.json"
    if done.exists():
        trained = json.loads((workdir / "config.json").read_text())["experiment"]
        wanted = c.to_dict()
        for key in ("base", "train", "data"):
            if trained[key] != json.loads(json.dumps(wanted[key])):
                raise ValueError(f"{workdir} holds predictors trained with another {key!r} "
                                 f"({trained[key]} != {wanted[key]}); pass another --workdir.")
        log(f"reusing the predictors in {workdir}")
        return json.loads(done.read_text())
    log(f"training predictors at T={s['seq_len']} for {s['steps']} steps into {workdir}")
    return predictors_lib.train_predictors(run_configs.predictors_config(c), workdir)


def fixed_selections(model, lemo: LeMoConfig, seq_len: int) -> list:
    """Per layer, a selection of the same capacity as the selector's, chosen by nothing."""
    nb = seq_len // lemo.block_size
    scores = jnp.asarray(np.random.default_rng(0).normal(size=(1, nb)), jnp.float32)
    return [None if r >= 1.0 else scoring.select_blocks(scores, r, lemo.block_size)
            for r in lemo.keep_ratios(len(model.layers))]


def overhead(s: dict, base: pathlib.Path | str, predictors_dir: pathlib.Path) -> list[dict]:
    """Rows: the LeMo step with each selection variant, timed side by side."""
    model, config, tokenizer = bases_lib.load_base(str(base))
    config = config.with_context(s["seq_len"])
    bases_lib.set_context(model, config)
    predictor.attach(model, predictor.load_predictors(predictors_dir, config))
    recipe = run_configs.finetune_config(finetune_small.get_config())
    lora.add_lora(model, recipe.lora, rngs=nnx.Rngs(1))
    tc = recipe.train.replace(seq_len=s["seq_len"], batch_size=1)
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=lora.LoRAParam)
    corpus = data.load_corpus(recipe.data.source)
    docs = data.encode_documents(tokenizer, corpus.train)
    batch = data.WindowBatches(docs, batch_size=1, seq_len=s["seq_len"], seed=0).batch(0)
    lemo = LeMoConfig(block_size=s["block_size"], selector="predictor")
    fixed = fixed_selections(model, lemo, s["seq_len"])

    def loss_for(variant):
        config = lemo.replace(selector="oracle") if variant == "oracle" else lemo
        selections = fixed if variant == "fixed" else None
        return lambda model, batch: lemo_loss(model, batch, lemo=config, selections=selections,
                                              loss_segment=tc.loss_segment)

    steps = {v: train.make_train_step(loss_for(v), wrt=lora.LoRAParam) for v in VARIANTS}
    for v in VARIANTS:  # compile and warm up
        for _ in range(2):
            timing.timed_step(steps[v], model, optimizer, batch)
    results = timing.interleaved(
        {v: functools.partial(lambda v: timing.timed_step(steps[v], model, optimizer, batch)[0], v)
         for v in VARIANTS}, max(s["reps"], 3))
    return [{"kind": "timing", "variant": v, "seq_len": s["seq_len"], "dtype": config.dtype,
             "step_s": results[v]["median_s"], "times_s": results[v]["times_s"]} for v in VARIANTS]


def main(argv):
    del argv
    _CONFIG.exit_if_help()
    try:
        tc = training()
    except ValueError as e:
        _checks.fail(_checks.flag_for_config_error(str(e)))
    logging.set_verbosity(logging.WARNING)
    s = settings(tc)
    if s["base"]:
        base, base_name = s["base"], pathlib.Path(s["base"]).name
    else:
        base = pathlib.Path(_BASE_WORKDIR.value or bases.default_base_workdir(s)).expanduser()
        bases.pretrain_base(s, base, log=log)
        base_name = base.name
    workdir = pathlib.Path(_WORKDIR.value
                           or data.cache_dir() / "bench" / "lemo_predictor" / run_name(base_name, tc))
    trained = train_or_load(s, tc, base, workdir)
    key = "@0.4"
    rows = [{"kind": "layer", "layer": int(layer), "recall@0.4": r,
             "spearman": trained["spearman"][layer], "sparse": int(layer) in trained["sparse_layers"],
             "widths": trained["widths"][layer]}
            for layer, r in trained[f"recall{key}"].items()]
    rows += overhead(s, base, workdir / "predictors")
    timed = {r["variant"]: r["step_s"] for r in rows if r["kind"] == "timing"}
    summary = {f"mean_recall{key}": trained[f"mean_recall{key}"],
               f"mean_recall_all_layers{key}": trained[f"mean_recall_all_layers{key}"],
               "mean_spearman": trained["mean_spearman"],
               "params_kept_ratio": trained["params_kept_ratio"],
               "params_before": trained["params_before"], "params_after": trained["params_after"],
               "overhead_ratio": timed["predictor"] / timed["fixed"],
               "oracle_overhead_ratio": timed["oracle"] / timed["fixed"]}
    for r in rows:
        if r["kind"] == "layer":
            print(f"layer {r['layer']:>2} {'sparse' if r['sparse'] else 'dense ':>6} recall@0.4 "
                  f"{r['recall@0.4']:.4f} spearman {r['spearman']:.4f} widths {r['widths']}")
        else:
            print(f"{r['variant']:>9} selection: step {r['step_s'] * 1e3:.1f} ms")
    print(json.dumps(summary, indent=1))
    trained_with = json.loads((workdir / "config.json").read_text())["experiment"]["train"]
    write_result(_OUT.value, "lemo_predictor", rows, summary, settings={
        **s, "smoke": _SMOKE.value, **({} if s["base"] else {"base_workdir": str(base)}),
        "predictor_workdir": str(workdir),
        "predictor_training": trained_with,
        "recall": "per sparse layer and held-out window, |TopK(pred) & TopK(oracle)| / K, "
        "K = floor(0.4 n_b); mean over windows, then over the default schedule's sparse layers",
        "overhead": "LeMo LoRA step, predictor selection / fixed selection of equal capacity; "
        "median of interleaved repetitions", "jax_backend": jax.default_backend()})


if __name__ == "__main__":
    _checks.run(main)
