"""LeMo predictors: held-out recall of the oracle's kept blocks, pruning, and their step-time cost.

    python -m experiments.bench.lemo_predictor --out bench_results/lemo_predictor.json \\
        [--preset=small --base_seq_len=512 --base_steps=400 --seq_len=2048 --steps=800]
    python -m experiments.bench.lemo_predictor --smoke --out /tmp/lemo_predictor.json  # tiny
    python -m experiments.bench.lemo_predictor --base=smollm2-135m --steps=400 --train_windows=64 \\
        --eval_windows=8 --reps=3 --out bench_results/lemo_predictor_smollm2.json  # a real base

1. **Base**: the same cached base as ``lemo_quality`` (pretrained at ``--base_seq_len``), or with
   ``--base`` a real pretrained model (a :mod:`tokensparse.zoo` name or anything
   :func:`tokensparse.pipelines.base.load_base` takes), with its own tokenizer; nothing is pretrained then.
2. **Predictors**: ``experiments.train_predictors`` (``predictors_small.py``) at ``--seq_len`` with
   RoPE scaling, ``--steps`` steps, elastic pruning, ``--loss`` and ``--lr``; reused when that run
   finished before with the same training settings (a workdir trained otherwise is an error).
   ``--weight_decay``, ``--h2`` and ``--sparse_only`` (predictors for the sparse layers only) change
   the training; the collected targets live on disk (``--targets_dir``, default in the workdir).
   Rows per layer: held-out recall@0.4 (``|TopK(ĉ) ∩ TopK(c)| / K``) and Spearman of ĉ with the
   oracle's column scores c, on ``--eval_windows`` validation windows.
3. **Overhead**: one LeMo LoRA step (default LeMoConfig, the base's weights, batch 1, ``--seq_len``)
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

from experiments import _checks, run_configs
from experiments.bench import bases, timing, write_result
from experiments.configs import finetune_small, predictors_small
from tokensparse import data, lora, train
from tokensparse.config import LeMoConfig, preset_names
from tokensparse.lemo import predictor, predictor_training, scoring
from tokensparse.lemo.forward import lemo_loss
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
_LOSS = flags.DEFINE_enum("loss", "column", predictor_training.LOSSES, "Predictor loss: 'column' "
                          "(standardised column scores, predictors_small.py's) or the spec's tile "
                          "loss 'smooth_l1'.")
_LR = flags.DEFINE_float("lr", 3e-4, "Predictor AdamW learning rate.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.0, "Predictor AdamW weight decay.")
_H2 = flags.DEFINE_integer("h2", 0, "Width of the predictors' second linear (0: the spec's b·d).")
_SPARSE_ONLY = flags.DEFINE_bool(
    "sparse_only", False, "Predictors only for the default schedule's sparse layers (the only ones "
    "fine-tuning runs); the dense layers' rows are then absent.")
_TARGETS_DIR = flags.DEFINE_string(
    "targets_dir", "", "Where the collected training targets are stored (default: "
    "<workdir>/targets); runs over the same base, context and layers can share one.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Predictor training, evaluation and timing context.")
_STEPS = flags.DEFINE_integer("steps", 800, "Predictor training steps.")
_TRAIN_WINDOWS = flags.DEFINE_integer("train_windows", 256, "Distinct training windows (cycled).")
_EVAL_WINDOWS = flags.DEFINE_integer("eval_windows", 16, "Held-out windows for recall.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Predictor run directory (default: "
                               "<cache>/bench/lemo_predictor/<base>-T<seq_len>-s<steps>); reused "
                               "when finished, resumed when interrupted.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed repetitions per variant (median; at least 3).")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny preset, few steps, short context (tests); flags "
                           "given explicitly still win.")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_predictor.json", "Where to write the JSON "
                           "(and its per-layer figure, the same path with .png).")

_checks.one_of(_PRESET, preset_names())
_checks.at_least(_BASE_SEQ_LEN, 2)
_checks.at_least(_BASE_STEPS, 1)
_checks.at_least(_BASE_BATCH, 1)
_checks.at_least(_SEQ_LEN, LeMoConfig().block_size, multiple_of=LeMoConfig().block_size,
                 why="LeMo keeps whole blocks")
_checks.at_least(_STEPS, 1)
_checks.at_least(_TRAIN_WINDOWS, 1)
_checks.at_least(_EVAL_WINDOWS, 1)
_checks.at_least(_REPS, 1)
flags.register_validator(_LR, lambda v: v > 0, "must be positive.")
flags.register_validator(_WEIGHT_DECAY, lambda v: v >= 0, "must be >= 0.")
_checks.at_least(_H2, 0)

SMOKE = {"preset": "tiny", "base_seq_len": 128, "base_steps": 8, "base_batch_size": 4,
         "seq_len": 256, "steps": 12, "train_windows": 4, "eval_windows": 2, "reps": 3}
_FLAGS = {"preset": _PRESET, "base_seq_len": _BASE_SEQ_LEN, "base_steps": _BASE_STEPS,
          "base_batch_size": _BASE_BATCH, "seq_len": _SEQ_LEN, "steps": _STEPS,
          "train_windows": _TRAIN_WINDOWS, "eval_windows": _EVAL_WINDOWS, "reps": _REPS}
VARIANTS = ("predictor", "fixed", "oracle")


def log(message: str) -> None:
    print(f"[lemo_predictor] {message}", flush=True)


def settings() -> dict:
    """Flag values, with ``--smoke`` replacing the defaults of unset flags. With ``--base`` the
    pretraining settings are left out: they describe nothing about a base not pretrained here."""
    out = {name: (SMOKE[name] if _SMOKE.value and not flags.FLAGS[name].present else flag.value)
           for name, flag in _FLAGS.items()}
    out.update(base=_BASE.value, loss=_LOSS.value, lr=_LR.value, weight_decay=_WEIGHT_DECAY.value,
               h2=_H2.value, sparse_only=_SPARSE_ONLY.value, targets_dir=_TARGETS_DIR.value,
               block_size=LeMoConfig().block_size)
    if out["base"]:
        for name in ("preset", "base_seq_len", "base_steps", "base_batch_size"):
            del out[name]
    else:
        out["vocab_size"] = 512 if out["preset"] == "tiny" else 8192
    return out


def predictor_config(s: dict, base: pathlib.Path | str):
    c = predictors_small.get_config()
    c.base, c.progress = str(base), True
    if "vocab_size" in s:  # a pretrained-here base: the corpus BPE of that size
        c.data.vocab_size = s["vocab_size"]
    c.train.seq_len, c.train.steps, c.train.block_size = s["seq_len"], s["steps"], s["block_size"]
    c.train.train_windows, c.train.eval_windows = s["train_windows"], s["eval_windows"]
    c.train.loss, c.train.lr, c.train.weight_decay = s["loss"], s["lr"], s["weight_decay"]
    c.train.h2, c.train.sparse_only, c.train.targets_dir = s["h2"], s["sparse_only"], s["targets_dir"]
    if s["steps"] < 100:  # short (smoke) runs prune too, twice
        c.train.prune_every, c.train.prune_until = max(s["steps"] // 2, 1), s["steps"]
    return c


def train_or_load(s: dict, base: pathlib.Path | str, workdir: pathlib.Path) -> dict:
    c = predictor_config(s, base)
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
    tokenizer = tokenizer or data.get_tokenizer(corpus, s["vocab_size"])  # a zoo base has its own
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
    logging.set_verbosity(logging.WARNING)
    s = settings()
    if s["base"]:
        base, base_name = s["base"], pathlib.Path(s["base"]).name
    else:
        base = pathlib.Path(_BASE_WORKDIR.value or bases.default_base_workdir(s)).expanduser()
        bases.pretrain_base(s, base, log=log)
        base_name = base.name
    name = (f"{base_name}-T{s['seq_len']}-s{s['steps']}-w{s['train_windows']}-{s['loss']}"
            f"-lr{s['lr']:g}" + (f"-wd{s['weight_decay']:g}" if s["weight_decay"] else "")
            + (f"-h2_{s['h2']}" if s["h2"] else "") + ("-sparse" if s["sparse_only"] else ""))
    workdir = pathlib.Path(_WORKDIR.value or data.cache_dir() / "bench" / "lemo_predictor" / name)
    trained = train_or_load(s, base, workdir)
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
