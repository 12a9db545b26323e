"""LeMo vs LoRA: held-out perplexity after equal-step long-context fine-tuning (LeMo's dense evaluation).

    python -m experiments.bench.lemo_quality --out bench_results/lemo_quality.json \\
        [--preset=small --base_seq_len=512 --base_steps=400 --seq_len=2048 --steps=1000]
    python -m experiments.bench.lemo_quality --smoke --out /tmp/lemo_quality.json  # tiny, seconds
    python -m experiments.bench.lemo_quality --base=smollm2-135m --seq_len=2048 --steps=40 \\
        --eval_batches=6 --nomlp_drop_ablation --workdir=DIR --checkpoint_every=10  # a real base
    python -m experiments.bench.lemo_quality --smoke --config.lemo.schedule=algorithm1 \\
        --config.lemo.calibration_windows=1 --out /tmp/q.json  # LeMo's options: --config.lemo.*

1. **Base.** Pretrain ``--preset`` on the corpus at the short context ``--base_seq_len``
   (:func:`tokensparse.pipelines.pretrain.pretrain`, ``experiments/configs/pretrain_small.py``). The
   base lives in ``--base_workdir`` and is reused when its ``summary.json`` exists, so reruns skip
   pretraining.
   With ``--base`` (a :mod:`tokensparse.zoo` name such as ``smollm2-135m``, or anything else
   :func:`tokensparse.pipelines.base.load_base` takes) nothing is pretrained: that real model is the base, and
   the corpus is tokenized with its own tokenizer (SmolLM2: 49152 ids, 8K context, so 2K fine-tuning
   needs no RoPE scaling). The ``--preset``/``--base_*`` flags then do not apply.
2. **Fine-tune** it at ``--seq_len`` for ``--steps`` (RoPE linear scaling; LoRA r=8, α=16 on
   q,k,v,o; AdamW β=(0.9, 0.95), 20 warm-up steps then constant: ``finetune_small.py``) with
   ``method=lora`` and ``method=lemo`` (default LeMoConfig: keep 0.4 in layers L/2-1..L-2, MLP
   backward drops 80% of channels), plus LeMo with ``mlp_drop=0.5`` (the paper's runs do not say which;
   ``--nomlp_drop_ablation`` skips it) and LeMo with ``mlp_mode="recompute"`` (the exact MLP
   backward from the MLP's input, a library option; ``--nomlp_recompute`` skips it). Every run has
   the same steps, data order and seed.
   LeMo's options are the fine-tuning config's, ``--config.lemo.*`` (``--config_help`` lists them;
   LoRA's are ``--config.lora.*``), except ``mlp_drop``, ``mlp_mode`` and ``selector``, which the
   benchmark sets per run. ``--config.lemo.schedule`` / ``--config.lemo.keep_ratio`` choose other
   LeMo schedules: ``all`` layers at the keep ratio, ``profile`` (per-layer keep ratios:
   ``--config.lemo.profile="[1.0, 0.5, ...]"``, or the ``"profile"`` of the JSON file
   ``--lemo_profile``), ``algorithm1`` (a per-layer keep profile tuned on
   ``--config.lemo.calibration_windows`` training windows for ``--config.lemo.tune_rounds`` rounds
   before fine-tuning; paper Algorithm 1) or ``sensitivity`` (the keep ratio in the layers where it costs the
   least calibration loss, within ``--config.lemo.loss_budget`` nats;
   :mod:`tokensparse.lemo.profiles.sensitivity`). Each variant is its own run
   (``lemo_algorithm1_mlp_drop0.8``, ``lemo_keep0.7_mlp_drop0.8``, ...), so one ``--workdir`` holds
   them all beside one LoRA run. LeMo rows carry the per-layer ``keep_profile`` they trained with
   and its ``mean_keep`` (1.0 = dense).
3. **Evaluate** each fine-tuned model on the same ``--eval_batches`` validation windows of
   ``--seq_len`` (sliding-window protocol): dense, with the trained LoRA (the spec's protocol), and
   for LeMo runs also with the sparse LeMo forward they were trained with. The base is scored on the
   same target tokens at its own context and at ``--seq_len`` with RoPE scaling but no training, so
   the reader sees what fine-tuning bought. A ``--base`` whose context already covers ``--seq_len``
   is scored at ``--seq_len`` only (summary ``base_ppl@<T>``; there is no short context of its own
   to compare with, and no ``base_ppl_rope_scaled`` key since nothing is scaled).

**Resuming.** With ``--workdir``, every finished fine-tuning (and the base evaluation) leaves its
row there and a rerun of the same command reuses it; an unfinished run resumes from its last
checkpoint (``--checkpoint_every``; SIGTERM / Ctrl-C also save one and stop the benchmark).

Summary: ``ppl_ratio`` = LeMo (mlp_drop 0.8) / LoRA perplexity, dense eval; ``ppl_ratio_mlp_drop0.5``
the same for mlp_drop 0.5, ``ppl_ratio_mlp_recompute`` for the recomputed (exact) MLP backward;
``sparse_ppl_ratio`` = LeMo's sparse-eval perplexity / LoRA's (dense) perplexity;
``lemo_mean_keep`` that run's mean per-layer keep ratio (how much it eliminated).
With ``--config.lemo.predictors=DIR`` LeMo is also fine-tuned selecting with trained predictors
(``predictor_ppl_ratio`` = that / LeMo with the chosen rule; the target is <= 1.01). Unlike the speed
and memory ratios these are method / baseline: smaller is better, and the library's target is
``ppl_ratio <= 1.03`` (the paper's PPL cost on PG19: +2–3%). ``base_ppl@<T>`` (no RoPE scaling) or
``base_ppl_rope_scaled@<T>`` name the base's perplexity at each context it was scored at.

Cost: the defaults (``small``, 1000 steps at 2048, three runs) are hours on a CPU: a ``small`` LoRA
step at 1024 took ~4 s on 2 busy cores, and the cost grows faster than linearly with T. Fewer
``--steps`` or a shorter ``--seq_len`` give a quicker, noisier answer; the ratio is only meaningful
once fine-tuning has moved the perplexity well below ``base_ppl_rope_scaled@<T>``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pathlib
import shutil
import tempfile
import time

import numpy as np
from absl import flags, logging
from ml_collections import config_dict

from experiments import _checks, config_dicts, run_configs
from experiments.bench import bases, loss_history, read_keep_profile, write_result
from experiments.configs import finetune_small
from tokensparse import data, train
from tokensparse.config import LeMoConfig
from tokensparse.pipelines import base as bases_lib
from tokensparse.pipelines import finetune as finetune_lib

_PRESET = flags.DEFINE_string("preset", "small", "Model preset of the base.")
_BASE_SEQ_LEN = flags.DEFINE_integer("base_seq_len", 512, "Pretraining context (the base's own).")
_BASE_STEPS = flags.DEFINE_integer("base_steps", 400, "Pretraining steps.")
_BASE_BATCH = flags.DEFINE_integer("base_batch_size", 8, "Pretraining batch size.")
_BASE_WORKDIR = flags.DEFINE_string(
    "base_workdir", None, "Pretraining workdir, reused if it holds summary.json (default: "
    "<cache>/bench/lemo_quality/<preset>-T<base_seq_len>-s<base_steps>).")
_BASE = flags.DEFINE_string(
    "base", "", "A real pretrained base instead of pretraining --preset: a tokensparse.zoo name "
    "(e.g. smollm2-135m) or a directory tokensparse.pipelines.base.load_base accepts.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Fine-tuning and evaluation context.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Fine-tuning steps of every run (a library budget).")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", 16, "Validation windows of seq_len.")
_MLP_ABLATION = flags.DEFINE_bool("mlp_drop_ablation", True, "Also fine-tune LeMo with mlp_drop=0.5.")
_MLP_RECOMPUTE = flags.DEFINE_bool("mlp_recompute", True, "Also fine-tune LeMo with "
                                   "mlp_mode='recompute' (the exact MLP backward, recomputed from "
                                   "the MLP's input; no channels dropped).")
_ATTENTION = flags.DEFINE_string("attention", "auto", "Attention backend of every run.")
_PROFILE = flags.DEFINE_string("lemo_profile", "", "With --config.lemo.schedule=profile: a JSON file "
                               "with a per-layer keep \"profile\" (a lemo_profile.json from an "
                               "Algorithm 1 run, or tokensparse.lemo.profiles.sensitivity's), instead of "
                               "--config.lemo.profile.")
_CONFIG = run_configs.define_config_flags(
    config_dict.ConfigDict({"lemo": finetune_small.get_config().lemo,
                            "lora": finetune_small.get_config().lora}), "finetune",
    "The fine-tuning config's LeMo and LoRA sections (experiments/configs/finetune_small.py): "
    "config.lemo is every LeMo run's (mlp_drop and mlp_mode are set per run; selector=auto is the "
    "library's default rule, learned); --config.lemo.predictors=DIR also fine-tunes LeMo selecting "
    "with those trained predictors (summary predictor_ppl_ratio = that / the other LeMo run).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the fine-tuning runs go (default: a temporary "
                               "directory); an existing run there is resumed.")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 0, "Checkpoint every fine-tuning this often (LoRA state only), so a killed "
    "run loses at most that many steps; 0: only at the end, keeping checkpoint I/O out of the timing.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Tiny preset, few steps, short context (tests); flags given "
                           "explicitly still win.")
_OUT = flags.DEFINE_string("out", "bench_results/lemo_quality.json", "Where to write the JSON "
                           "(and the runs' loss curves, the same path with .png).")

for _flag, _minimum in ((_BASE_SEQ_LEN, 2), (_BASE_STEPS, 1), (_BASE_BATCH, 1), (_STEPS, 1),
                        (_EVAL_BATCHES, 1)):
    _checks.at_least(_flag, _minimum)
_checks.at_least(_SEQ_LEN, 64, multiple_of=64, why="LeMo keeps whole 64-token blocks")
PER_RUN = ("mlp_drop", "mlp_mode")  # LeMo fields the benchmark sets run by run

SMOKE = {"preset": "tiny", "base_seq_len": 128, "base_steps": 8, "base_batch_size": 4,
         "seq_len": 256, "steps": 3, "eval_batches": 2}
_FLAGS = {"preset": _PRESET, "base_seq_len": _BASE_SEQ_LEN, "base_steps": _BASE_STEPS,
          "base_batch_size": _BASE_BATCH, "seq_len": _SEQ_LEN, "steps": _STEPS,
          "eval_batches": _EVAL_BATCHES}


def log(message: str) -> None:
    print(f"[lemo_quality] {message}", flush=True)


def lemo_options() -> dict:
    """``--config.lemo``'s fields for every LeMo run (the profile from ``--lemo_profile`` when
    given), without the per-run ones and the predictors directory."""
    lemo = _CONFIG.value.lemo.to_dict()
    if _PROFILE.value:
        if lemo["profile"]:
            raise ValueError("give --lemo_profile (a file) or --config.lemo.profile, not both.")
        lemo["profile"] = read_keep_profile(_PROFILE.value)
    return {k: v for k, v in lemo.items() if k not in (*PER_RUN, "predictors")}


def predictors_dir() -> str:
    return _CONFIG.value.lemo.predictors


def check_options(s: dict) -> None:
    """Fail unless every run's config builds: LeMo's and LoRA's options are valid, the per-run
    fields are left to the benchmark."""
    defaults = finetune_small.get_config().lemo
    changed = [k for k in PER_RUN if _CONFIG.value.lemo[k] != defaults[k]]
    if changed:
        raise ValueError(f"config.lemo: {', '.join(changed)} are set run by run by this benchmark "
                         "(--nomlp_drop_ablation, --nomlp_recompute and --config.lemo.predictors "
                         "choose the runs).")
    for method, predictors in (("lora", ""), ("lemo", ""), ("lemo", predictors_dir())):
        run_configs.finetune_config(finetune_config(s, "base", method, 0.8, predictors))


def settings() -> dict:
    """The run's settings: flag values, with ``--smoke`` replacing the defaults of unset flags.

    With ``--base`` the pretraining settings (preset, base context, steps, batch, vocabulary) are
    left out: they describe nothing about a base that was not pretrained here."""
    out = {}
    for name, flag in _FLAGS.items():
        given = flags.FLAGS[name].present
        out[name] = SMOKE[name] if _SMOKE.value and not given else flag.value
    out["base"] = _BASE.value
    if out["base"]:
        return {k: out[k] for k in ("base", "seq_len", "steps", "eval_batches")}
    out["vocab_size"] = 512 if out["preset"] == "tiny" else 8192
    if out["seq_len"] <= out["base_seq_len"]:
        raise ValueError(f"--seq_len={out['seq_len']} must exceed --base_seq_len="
                         f"{out['base_seq_len']}: the benchmark extends the base's context.")
    return out


def pretrain_base(s: dict, workdir: pathlib.Path) -> dict:
    """Pretrain the base into ``workdir``, or reuse it when that run finished before."""
    return bases.pretrain_base(s, workdir, attention=_ATTENTION.value, log=log)


def windows_covering(docs, seq_len: int, n_targets: int) -> list[data.EvalWindow]:
    """Eval windows of ``seq_len`` that score exactly the first ``n_targets`` targets of ``docs``.

    :func:`tokensparse.data.eval_windows` scores targets in document order whatever the window
    length, so this scores the same tokens as the first windows of any other length, with less
    context."""
    out, left = [], n_targets
    for window in data.eval_windows(docs, seq_len=seq_len):
        if left <= 0:
            break
        mask = window.loss_mask.copy()
        scored = np.flatnonzero(mask[0])
        mask[0, scored[left:]] = 0.0
        left -= min(len(scored), left)
        out.append(window._replace(loss_mask=mask))
    return out


def _dense_eval(model, windows) -> dict:
    """Dense perplexity with the fine-tuning configs' segmented loss: the same numbers as the full
    loss, without [T, vocab] logits at once (2K x 49152 floats for SmolLM2)."""
    segment = finetune_small.get_config().train.loss_segment
    step = train.make_eval_step(lambda model, batch: train.lm_loss(model, batch, loss_segment=segment))
    return train.evaluate(step, model, windows)


def base_contexts(s: dict) -> list[int]:
    """Contexts the base is scored at: a pretrained base at its own and at seq_len; a ``--base`` at
    seq_len only (its own context is what it was released with, not a setting of this run)."""
    return [s["seq_len"]] if s.get("base") else [s["base_seq_len"], s["seq_len"]]


def evaluate_base(s: dict, base: pathlib.Path | str) -> list[dict]:
    """Rows for the base before fine-tuning at each of :func:`base_contexts` (RoPE scaled as
    fine-tuning would scale it), all on the target tokens of the fine-tuned runs' validation
    windows. ``rope_factor`` says how much each row's RoPE was stretched (1: not at all)."""
    model, config, tokenizer = bases_lib.load_base(str(base), attention_backend=_ATTENTION.value)
    corpus = data.load_corpus(finetune_small.get_config().data.source)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    long = list(itertools.islice(data.eval_windows(val_docs, seq_len=s["seq_len"]),
                                 s["eval_batches"]))
    n_targets = int(sum(w.loss_mask.sum() for w in long))
    rows = []
    for seq_len in base_contexts(s):
        windows = long if seq_len == s["seq_len"] else windows_covering(val_docs, seq_len, n_targets)
        context = config.with_context(seq_len)
        bases_lib.set_context(model, context)
        start = time.perf_counter()
        result = _dense_eval(model, windows)
        row = _row("base", None, 0, seq_len, {f"val_{k}": v for k, v in result.items()},
                   time.perf_counter() - start)
        rows.append({**row, "rope_factor": context.rope_scaling.factor})
        log(f"base at T={seq_len}: val ppl {result['ppl']:.3f} over {result['tokens']:.0f} tokens")
    return rows


def _reuse_or_run(path: pathlib.Path, key: dict, compute):
    """``compute()``, remembered in ``path`` under ``key`` (JSON): a rerun with the same key reads
    it back instead, so an interrupted benchmark does not repeat finished fine-tunings."""
    key = json.loads(json.dumps(key))
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            log(f"reusing {path}")
            return saved["value"]
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=1))
    return value


class Interrupted(RuntimeError):
    """A fine-tuning stopped early (SIGTERM / Ctrl-C); its checkpoint is where a rerun continues."""


def finetune_config(s: dict, base: pathlib.Path, method: str, mlp_drop: float | None,
                    predictors: str = "", mlp_mode: str = "channel_sparse_bwd"):
    """``finetune_small.py`` with this benchmark's base, method, length, steps and eval windows
    (LeMo selects with ``--config.lemo.selector``, or with ``predictors`` when given; ``mlp_drop``
    applies to the channel-sparse ``mlp_mode`` only)."""
    c = finetune_small.get_config()
    c.base, c.method, c.attention_backend = str(base), method, _ATTENTION.value
    c.lora = _CONFIG.value.lora
    c.lemo.predictors = predictors
    if method == "lemo":  # (a LoRA run's key, and so its reuse, must not depend on LeMo's options)
        for name, value in lemo_options().items():
            c.lemo[name] = value
        c.lemo.mlp_mode = mlp_mode
        if predictors:
            c.lemo.selector, c.lemo.selector_weights = "predictor", ""
    if mlp_drop is not None:
        c.lemo.mlp_drop = mlp_drop
    if "vocab_size" in s:  # a --base brings its own tokenizer, which finetune uses instead
        c.data.vocab_size = s["vocab_size"]
    c.train.seq_len, c.train.steps, c.train.eval_batches = s["seq_len"], s["steps"], s["eval_batches"]
    # By default only at the end: no checkpoint I/O inside the timing.
    c.train.checkpoint_every = _CHECKPOINT_EVERY.value or s["steps"]
    c.train.log_every = max(min(c.train.log_every, s["steps"]), 1)
    return c


NAMED = ("schedule", "keep_ratio", "loss_budget", "profile", "calibration_windows", "tune_rounds")


def lemo_variant(*, selector: bool = True) -> str:
    """The run-name part that tells LeMo settings apart ("" for the default: keep 0.4, "half"): the
    schedule and what it depends on, then any other LeMo field changed (``_block_size32``)."""
    o, default = lemo_options(), LeMoConfig()
    schedule, keep = o["schedule"], o["keep_ratio"]
    if schedule == "algorithm1":
        name = "_algorithm1"
    elif schedule == "profile":
        given = (pathlib.Path(_PROFILE.value).stem if _PROFILE.value else
                 hashlib.sha1(json.dumps(list(o["profile"])).encode()).hexdigest()[:8])
        name = f"_profile-{given}"
    elif schedule == "sensitivity":
        name = f"_sensitivity_keep{keep:g}_budget{o['loss_budget']:g}"
    else:
        name = ("" if schedule == "half" else f"_{schedule}") + ("" if keep == 0.4 else f"_keep{keep:g}")
    for field, value in o.items():
        if field == "selector":  # e.g. lemo_oracle; a predictor run is named by its predictors
            name += "" if not selector or value in ("auto", default.selector) else f"_{value}"
            continue
        if field == "selector_weights":  # a file for the learned selector: named by its stem
            name += f"_selector-{pathlib.Path(value).stem}" if selector and value else ""
            continue
        if field not in NAMED and value != getattr(default, field):
            name += f"_{field}{value:g}" if isinstance(value, float) else f"_{field}{value}"
    return name


def kept_fractions(workdir: pathlib.Path, lemo_dict) -> list[float]:
    """The per-layer keep ratios a LeMo run (config ``lemo_dict``) trained with: Algorithm 1's tuned
    profile when the run wrote one, else its schedule's."""
    tuned = workdir / "lemo_profile.json"
    if tuned.exists():
        return list(json.loads(tuned.read_text())["profile"])
    n_layers = json.loads((workdir / "config.json").read_text())["model"]["n_layers"]
    values = {k: v for k, v in lemo_dict.to_dict().items()
              if k not in (*run_configs.LEMO_PATHS, "selector")}
    return list(config_dicts.from_dict(LeMoConfig, values, "config.lemo").keep_ratios(n_layers))


def _row(method: str, mlp_drop, steps: int, seq_len: int, summary: dict, wall_s: float,
         selector: str | None = None, mlp_mode: str | None = None) -> dict:
    keys = ("val_loss", "val_ppl", "val_tokens", "val_sparse_loss", "val_sparse_ppl", "train_loss",
            "tokens_per_s")
    return {"method": method, "mlp_drop": mlp_drop, "mlp_mode": mlp_mode, "selector": selector,
            "steps": steps, "seq_len": seq_len, **{k: summary.get(k) for k in keys}, "wall_s": wall_s}


def run_name(method: str, mlp_drop: float | None, predictors: str = "",
             mlp_mode: str = "channel_sparse_bwd") -> str:
    name = method + ("" if method != "lemo" else lemo_variant(selector=not predictors))
    name += "" if mlp_drop is None else f"_mlp_drop{mlp_drop}"
    name += "_mlp_recompute" if method == "lemo" and mlp_mode == "recompute" else ""
    return name + ("_predictor" if predictors else "")


TUNED_SCHEDULES = ("algorithm1", "sensitivity")


def share_tuned_profile(workdir: pathlib.Path, source: str, target: str) -> None:
    """Give run ``target`` the profile run ``source`` tuned (``lemo_profile.json``), unless it has
    one: both tune on the same calibration windows with the same exact forward (the MLP mode only
    changes the backward), so tuning again would repeat the same minutes of forwards."""
    tuned, destination = workdir / source / "lemo_profile.json", workdir / target / "lemo_profile.json"
    if tuned.exists() and not destination.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tuned, destination)
        log(f"{target} uses the profile {source} tuned")


def finetune_run(s: dict, base: pathlib.Path, workdir: pathlib.Path, method: str,
                 mlp_drop: float | None, predictors: str = "",
                 mlp_mode: str = "channel_sparse_bwd") -> dict:
    name = run_name(method, mlp_drop, predictors, mlp_mode)
    c = finetune_config(s, base, method, mlp_drop, predictors, mlp_mode)
    selector = run_configs.finetune_config(c).lemo.selector if method == "lemo" else None

    def compute():
        log(f"fine-tuning {name} at T={s['seq_len']} for {s['steps']} steps")
        start = time.perf_counter()
        summary = finetune_lib.finetune(run_configs.finetune_config(c), workdir / name)
        if summary["interrupted"]:
            raise Interrupted(f"{name} stopped at step {summary['steps']}/{s['steps']}; rerun the "
                              f"same command with --workdir={workdir} to continue from there.")
        return _row(method, mlp_drop, s["steps"], s["seq_len"], summary,
                    time.perf_counter() - start, selector, c.lemo.mlp_mode if method == "lemo" else None)

    key = {k: v for k, v in c.to_dict().items()
           if k != "progress" and not (k == "lemo" and method != "lemo")}  # LoRA ignores lemo.*
    key["selector"] = selector  # "auto" names the library's default, which may change
    row = _reuse_or_run(workdir / name / "bench_row.json", key, compute)
    row["loss_history"] = loss_history(workdir / name)  # from the run's log, reused or not
    if method == "lemo":
        row["keep_profile"] = kept_fractions(workdir / name, c.lemo)
        row["mean_keep"] = float(np.mean(row["keep_profile"]))
    sparse = "" if row["val_sparse_ppl"] is None else f", sparse-eval ppl {row['val_sparse_ppl']:.3f}"
    log(f"{name}: val ppl {row['val_ppl']:.3f}{sparse}, {row['tokens_per_s'] or 0:.0f} train tokens/s, "
        f"{row['wall_s']:.0f} s")
    return row


def summarise(s: dict, base_rows: list[dict], lora: dict, lemo: list[dict]) -> dict:
    chosen = [r for r in lemo if r["selector"] != "predictor"]  # the runs with the chosen rule
    by_drop = {r["mlp_drop"]: r for r in chosen if r.get("mlp_mode") != "recompute"}
    recomputed = [r for r in chosen if r.get("mlp_mode") == "recompute"]
    predicted = [r for r in lemo if r["selector"] == "predictor"]
    main = by_drop[0.8]
    summary = {"ppl_ratio": main["val_ppl"] / lora["val_ppl"]}
    if 0.5 in by_drop:
        summary["ppl_ratio_mlp_drop0.5"] = by_drop[0.5]["val_ppl"] / lora["val_ppl"]
    if recomputed:
        summary["ppl_ratio_mlp_recompute"] = recomputed[0]["val_ppl"] / lora["val_ppl"]
    summary["sparse_ppl_ratio"] = main["val_sparse_ppl"] / lora["val_ppl"]
    for row in base_rows:
        scaled = "_rope_scaled" if row["rope_factor"] > 1 else ""
        summary[f"base_ppl{scaled}@{row['seq_len']}"] = row["val_ppl"]
    summary[f"lora_ppl@{s['seq_len']}"] = lora["val_ppl"]
    summary[f"lemo_ppl@{s['seq_len']}"] = main["val_ppl"]
    summary["lemo_mean_keep"] = main["mean_keep"]
    if predicted:
        summary["predictor_ppl_ratio"] = predicted[0]["val_ppl"] / main["val_ppl"]
        summary["predictor_lora_ppl_ratio"] = predicted[0]["val_ppl"] / lora["val_ppl"]
        summary[f"lemo_predictor_ppl@{s['seq_len']}"] = predicted[0]["val_ppl"]
    return summary


def print_table(rows: list[dict]) -> None:
    print(f"{'method':>6} {'selector':>9} {'mlp_drop':>8} {'T':>6} {'steps':>6} {'val ppl':>9} "
          f"{'sparse ppl':>10} {'tok/s':>8} {'wall s':>7}")
    for r in rows:
        sparse = "-" if r["val_sparse_ppl"] is None else f"{r['val_sparse_ppl']:.3f}"
        drop = "-" if r["mlp_drop"] is None else f"{r['mlp_drop']}"
        print(f"{r['method']:>6} {r.get('selector') or '-':>9} {drop:>8} {r['seq_len']:>6} "
              f"{r['steps']:>6} {r['val_ppl']:>9.3f} "
              f"{sparse:>10} {r['tokens_per_s'] or 0:>8.0f} {r['wall_s']:>7.1f}")


def run(s: dict, base: pathlib.Path | str, workdir: pathlib.Path) -> tuple[list[dict], dict]:
    """The base (pretrained here unless ``--base``), its evaluation, then every fine-tuning."""
    if not s.get("base"):
        base_summary = pretrain_base(s, base)
        log(f"base: train loss {base_summary['train_loss']:.3f}, val ppl at T={s['base_seq_len']} "
            f"(packed rows) {base_summary['val_ppl']:.3f}")
    key = {"base": str(base), "contexts": base_contexts(s), "eval_batches": s["eval_batches"],
           "attention": _ATTENTION.value}
    base_rows = _reuse_or_run(workdir / "base_rows.json", key, lambda: evaluate_base(s, base))
    lora = finetune_run(s, base, workdir, "lora", None)
    mlps = [(0.8, "channel_sparse_bwd")]
    mlps += [(0.5, "channel_sparse_bwd")] if _MLP_ABLATION.value else []
    mlps += [(None, "recompute")] if _MLP_RECOMPUTE.value else []
    lemo = []
    for p, mode in mlps:
        if lemo and lemo_options()["schedule"] in TUNED_SCHEDULES:
            share_tuned_profile(workdir, run_name("lemo", 0.8), run_name("lemo", p, "", mode))
        lemo.append(finetune_run(s, base, workdir, "lemo", p, mlp_mode=mode))
    if predictors_dir():
        lemo.append(finetune_run(s, base, workdir, "lemo", 0.8, predictors_dir()))
    rows = [*base_rows, lora, *lemo]
    return rows, summarise(s, base_rows, lora, lemo)


def main(argv):
    del argv
    _CONFIG.exit_if_help()
    try:
        s = settings()
        check_options(s)
    except ValueError as e:
        _checks.fail(_checks.flag_for_config_error(str(e)))
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    base = s["base"] or pathlib.Path(_BASE_WORKDIR.value or bases.default_base_workdir(s)).expanduser()
    with tempfile.TemporaryDirectory(prefix="lemo_quality_") as tmp:
        workdir = pathlib.Path(_WORKDIR.value or tmp).expanduser()
        try:
            rows, summary = run(s, base, workdir)
        except Interrupted as e:
            log(f"interrupted: {e}" + ("" if _WORKDIR.value else " (pass --workdir to be able to "
                                        "resume: this one was temporary)"))
            raise SystemExit(1) from None
    print_table(rows)
    print(json.dumps(summary, indent=1))
    c = finetune_config(s, base, "lemo", None)
    write_result(_OUT.value, "lemo_quality", rows, summary, settings={
        **s, "smoke": _SMOKE.value, "attention": _ATTENTION.value, "lemo_schedule": c.lemo.schedule,
        **({} if s["base"] else {"base_workdir": str(base)}),
        "checkpoint_every": _CHECKPOINT_EVERY.value,
        "lora": c.lora.to_dict(), "lemo": c.lemo.to_dict(), "lr": c.train.lr,
        "warmup_steps": c.train.warmup_steps, "schedule": c.train.schedule,
        "batch_size": c.train.batch_size, "seed": c.train.seed,
        "eval": "dense with the trained LoRA (the paper's protocol); sparse = the LeMo forward",
        "ratios": "perplexity ratios are method / LoRA: smaller is better"})


if __name__ == "__main__":
    _checks.run(main)
