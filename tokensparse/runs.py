"""Experiment runs built from ``ml_collections`` configs: pretraining, LoRA fine-tuning and LeMo
predictor training.

The absl scripts in ``experiments/`` only parse flags and call these. Every config value is
validated here *before* anything is compiled, with errors that name the config key.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib
from typing import Any

import numpy as np
from flax import nnx
from ml_collections import config_dict

from tokensparse import data, hf, lora, train
from tokensparse.config import LeMoConfig, LoRAConfig, ModelConfig, TrainConfig, preset
from tokensparse.lemo import predictor, predictor_training
from tokensparse.lemo.model import check_lemo, lemo_loss
from tokensparse.lemo.predictor_training import PredictorTrainConfig
from tokensparse.llama import Llama
from tokensparse.loop import LoopResult, check_resumable, train_loop
from tokensparse.metrics import compiled_memory

_OVERRIDABLE = {f.name: f.type for f in dataclasses.fields(ModelConfig)
                if f.name not in ("rope_scaling",)}
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def model_config_dict(name: str, **overrides: Any) -> config_dict.ConfigDict:
    """``{preset, overrides}`` where every ModelConfig scalar can be overridden from the command line."""
    slots = {k: config_dict.placeholder(_TYPES[t]) for k, t in _OVERRIDABLE.items()}
    slots.update(overrides)
    return config_dict.ConfigDict({"preset": name, "overrides": slots})


def train_config_dict(**changes: Any) -> config_dict.ConfigDict:
    values = dataclasses.asdict(TrainConfig(**changes))
    values["remat_names"] = list(values["remat_names"])
    return config_dict.ConfigDict(values)


def _dataclass_from(cls, values: dict[str, Any], where: str):
    """``cls(**values)``, with unknown keys and invalid values reported under ``where``."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}.")
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from None


def build_train_config(c: config_dict.ConfigDict) -> TrainConfig:
    values = c.to_dict()
    if "remat_names" in values:
        values["remat_names"] = tuple(values["remat_names"])
    return _dataclass_from(TrainConfig, values, "config.train")


def lemo_config_dict(**changes: Any) -> config_dict.ConfigDict:
    """LeMoConfig fields, plus ``predictors`` (a directory written by ``train_predictors``) and
    ``selector="auto"``: the predictors when a directory is given, the oracle otherwise."""
    predictors = changes.pop("predictors", "")
    selector = changes.pop("selector", "auto")
    values = dataclasses.asdict(LeMoConfig(**changes))
    values["profile"] = list(values["profile"] or [])
    values.update(selector=selector, predictors=predictors)
    return config_dict.ConfigDict(values)


def build_lemo_config(c: config_dict.ConfigDict) -> LeMoConfig:
    values = c.to_dict()
    values["profile"] = tuple(values["profile"]) or None
    predictors = values.pop("predictors", "")
    if values.get("selector") == "auto":
        values["selector"] = "predictor" if predictors else "oracle"
    if values.get("selector") == "predictor" and not predictors:
        raise ValueError("config.lemo.selector='predictor' needs config.lemo.predictors=DIR (the "
                         "predictors/ directory of an experiments.train_predictors run).")
    return _dataclass_from(LeMoConfig, values, "config.lemo")


def build_model_config(c: config_dict.ConfigDict, *, vocab_size: int | None = None) -> ModelConfig:
    overrides = {k: v for k, v in c.overrides.to_dict().items() if v is not None}
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    try:
        return preset(c.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model: {e}") from None


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def _prepare_data(c: config_dict.ConfigDict, workdir: pathlib.Path):
    corpus = data.load_corpus(c.data.source)
    tokenizer = data.get_tokenizer(corpus, c.data.vocab_size)
    tokenizer.save(str(workdir / "tokenizer.json"))
    return corpus, tokenizer


def _check_vocab(tokenizer, model_config: ModelConfig) -> None:
    if tokenizer.get_vocab_size() > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}; set config.model.overrides.vocab_size >= "
            f"{tokenizer.get_vocab_size()} or config.data.vocab_size <= {model_config.vocab_size}.")


def unigram_entropy(docs) -> float:
    """Entropy (nats/token) of the corpus' unigram distribution: the loss of the best model that
    ignores context, a yardstick for "the model learned something"."""
    counts = np.bincount(np.concatenate(list(docs)))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _eval_fn(eval_batches, loss_fn):
    eval_step = train.make_eval_step(loss_fn)
    return lambda model: train.evaluate(eval_step, model, eval_batches)


def _summary(model, optimizer, step_fn, batch, result: LoopResult, final_eval: dict) -> dict:
    cost = compiled_memory(step_fn, model, optimizer, batch)
    last = result.history[-1] if result.history else {}
    summary = {"steps": result.step, "interrupted": result.interrupted,
               "train_loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"),
               "activation_bytes": cost.temp_bytes, "argument_bytes": cost.argument_bytes,
               **{f"val_{k}": v for k, v in final_eval.items()}}
    return summary


def pretrain(c: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Pretrain a model from scratch on packed documents; resumes from ``workdir`` if possible."""
    workdir = pathlib.Path(workdir)
    tc = build_train_config(c.train)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = _prepare_data(c, workdir)
    model_config = build_model_config(c.model, vocab_size=tokenizer.get_vocab_size())
    _check_vocab(tokenizer, model_config)
    check_resumable(workdir, {"model": model_config.to_dict()})
    train_docs = data.encode_documents(tokenizer, corpus.train)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    data.check_tokens(np.concatenate(train_docs + val_docs), model_config.vocab_size)
    batches = data.PackedBatches(train_docs, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                 seed=tc.seed)
    val = data.PackedBatches(val_docs, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=0)
    eval_batches = [val.batch(i) for i in range(min(tc.eval_batches, val.steps_per_epoch))]
    _write_json(workdir / "config.json", {"experiment": c.to_dict(),
                                          "model": model_config.to_dict()})

    model = Llama(model_config, attention_backend=c.attention_backend, remat=tc.remat,
                  remat_names=tc.remat_names, rngs=nnx.Rngs(tc.seed))
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=nnx.Param)

    def loss_fn(model, batch):
        return train.lm_loss(model, batch, loss_segment=tc.loss_segment)

    step_fn = train.make_train_step(loss_fn)
    evaluate = _eval_fn(eval_batches, loss_fn)
    result = train_loop(workdir=workdir, model=model, optimizer=optimizer, train_step=step_fn,
                        batches=batches, tc=tc,
                        metadata={"model": model_config.to_dict(), "experiment": c.to_dict()},
                        eval_fn=evaluate, progress=c.progress)
    summary = _summary(model, optimizer, step_fn, batches.batch(0), result, evaluate(model))
    summary["unigram_entropy"] = unigram_entropy(train_docs)
    hf.save_llama(model, model_config, workdir / "hf")  # the base for fine-tuning
    _write_json(workdir / "summary.json", summary)
    return summary


def load_base(base: str, *, attention_backend: str = "auto"):
    """(model, config, tokenizer-or-None) from a pretraining workdir of ours (its ``hf/`` export and
    ``tokenizer.json``) or a Hugging Face directory (config.json + *.safetensors)."""
    if not base:
        raise ValueError("config.base is empty: point it at a pretraining --workdir or a Hugging "
                         "Face directory (config.json + *.safetensors).")
    path = pathlib.Path(base)
    if (path / "hf").is_dir():
        from tokenizers import Tokenizer

        model, model_config = hf.load_llama(path / "hf", attention_backend=attention_backend)
        return model, model_config, Tokenizer.from_file(str(path / "tokenizer.json"))
    model, model_config = hf.load_llama(path, attention_backend=attention_backend)
    return model, model_config, None


def finetune(c: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """LoRA fine-tuning of a base model at ``config.train.seq_len`` on long-document windows, with
    RoPE linear scaling to the target length; evaluation is dense perplexity on validation windows.

    The summary's ``val_*`` keys are that dense evaluation (the LeMo spec's protocol, §2.9). With
    ``method="lemo"`` the same windows are also scored with the LeMo forward the model was trained
    with (``val_sparse_loss``, ``val_sparse_ppl``, ``val_sparse_tokens``): the train/eval gap."""
    workdir = pathlib.Path(workdir)
    tc = build_train_config(c.train)
    lora_config = LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                             targets=tuple(c.lora.targets))
    if c.method not in ("lora", "lemo"):
        raise ValueError(f"config.method={c.method!r} must be 'lora' or 'lemo'.")
    lemo_config = build_lemo_config(c.lemo) if c.method == "lemo" else None
    workdir.mkdir(parents=True, exist_ok=True)
    model, base_config, base_tokenizer = load_base(c.base, attention_backend=c.attention_backend)
    corpus = data.load_corpus(c.data.source)
    tokenizer = base_tokenizer or data.get_tokenizer(corpus, c.data.vocab_size)
    tokenizer.save(str(workdir / "tokenizer.json"))
    _check_vocab(tokenizer, base_config)
    model_config = base_config.with_context(tc.seq_len)
    check_resumable(workdir, {"model": model_config.to_dict()})
    set_context(model, model_config)
    model.remat, model.remat_names = tc.remat, tc.remat_names
    if lemo_config is not None and lemo_config.selector == "predictor":
        predictor.attach(model, predictor.load_predictors(c.lemo.predictors, model_config))
    lora.add_lora(model, lora_config, rngs=nnx.Rngs(tc.seed))

    train_docs = data.encode_documents(tokenizer, corpus.train)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    data.check_tokens(np.concatenate(train_docs + val_docs), model_config.vocab_size)
    batches = data.WindowBatches(train_docs, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                 seed=tc.seed)
    eval_batches = list(itertools.islice(data.eval_windows(val_docs, seq_len=tc.seq_len),
                                         tc.eval_batches))
    _write_json(workdir / "config.json", {"experiment": c.to_dict(),
                                          "model": model_config.to_dict()})
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=lora.LoRAParam)

    def loss_fn(model, batch):  # evaluation is always dense (LeMo spec §2.9)
        return train.lm_loss(model, batch, loss_segment=tc.loss_segment)

    def train_loss_fn(model, batch):
        if lemo_config is None:
            return loss_fn(model, batch)
        return lemo_loss(model, batch, lemo=lemo_config, loss_segment=tc.loss_segment)

    if lemo_config is not None and lemo_config.schedule == "algorithm1":
        lemo_config = _tune_lemo_profile(model, lemo_config, train_docs, tc, workdir)
    if lemo_config is not None:
        check_lemo(model, lemo_config, tc.seq_len)
    step_fn = train.make_train_step(train_loss_fn, wrt=lora.LoRAParam)
    evaluate = _eval_fn(eval_batches, loss_fn)
    result = train_loop(workdir=workdir, model=model, optimizer=optimizer, train_step=step_fn,
                        batches=batches, tc=tc, wrt=lora.LoRAParam,
                        metadata={"model": model_config.to_dict(), "experiment": c.to_dict()},
                        eval_fn=evaluate, progress=c.progress)
    summary = _summary(model, optimizer, step_fn, batches.batch(0), result, evaluate(model))
    if lemo_config is not None:
        sparse = _eval_fn(eval_batches, train_loss_fn)(model)
        summary.update({f"val_sparse_{k}": v for k, v in sparse.items()})
    _write_json(workdir / "summary.json", summary)
    return summary


def _tune_lemo_profile(model, lemo_config: LeMoConfig, train_docs, tc: TrainConfig,
                       workdir: pathlib.Path) -> LeMoConfig:
    """Algorithm 1 on calibration windows of the train split (their own seed, batch 1); the tuned
    profile is written to ``workdir/lemo_profile.json`` and reused when resuming."""
    path = workdir / "lemo_profile.json"
    if path.exists():
        profile = tuple(json.loads(path.read_text())["profile"])
    else:
        from tokensparse.lemo.threshold import tune_thresholds

        windows = data.WindowBatches(train_docs, batch_size=1, seq_len=tc.seq_len, seed=tc.seed + 1)
        calibration = [windows.batch(i) for i in range(lemo_config.calibration_windows)]
        tuned = tune_thresholds(model, calibration, lemo_config, rounds=lemo_config.tune_rounds)
        profile = tuned.profile
        _write_json(path, {"thresholds": tuned.thresholds, "profile": profile,
                           "history": tuned.history})
    return lemo_config.replace(schedule="profile", profile=profile)


def predictor_train_config(c: config_dict.ConfigDict) -> PredictorTrainConfig:
    values = c.to_dict()
    values["layers"] = tuple(values.get("layers") or ())
    return _dataclass_from(PredictorTrainConfig, values, "config.train")


def train_predictors(c: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train LeMo predictors for a frozen base at ``config.train.seq_len`` (RoPE linear scaling to
    it, as fine-tuning will use) on train-split windows; report held-out recall and Spearman.

    Writes ``workdir/predictors`` (load with ``--config.lemo.predictors`` in fine-tuning),
    ``metrics.jsonl``, ``summary.json``; resumes from ``workdir/checkpoints``."""
    workdir = pathlib.Path(workdir)
    tc = predictor_train_config(c.train)
    workdir.mkdir(parents=True, exist_ok=True)
    model, base_config, base_tokenizer = load_base(c.base, attention_backend=c.attention_backend)
    corpus = data.load_corpus(c.data.source)
    tokenizer = base_tokenizer or data.get_tokenizer(corpus, c.data.vocab_size)
    _check_vocab(tokenizer, base_config)
    model_config = base_config.with_context(tc.seq_len)
    set_context(model, model_config)
    train_docs = data.encode_documents(tokenizer, corpus.train)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    train_windows = data.WindowBatches(train_docs, batch_size=1, seq_len=tc.seq_len, seed=tc.seed)
    held_out = data.WindowBatches(val_docs, batch_size=1, seq_len=tc.seq_len, seed=tc.seed + 1)
    _write_json(workdir / "config.json", {"experiment": c.to_dict(),
                                          "model": model_config.to_dict()})
    run = predictor_training.train_predictors(model, train_windows, tc, workdir,
                                              metadata={"base": str(c.base)}, progress=c.progress)
    before, after = run.params_before, run.predictors.num_params()
    summary = {"steps": run.step, "interrupted": run.interrupted,
               "train_loss": run.history[-1]["loss"] if run.history else None,
               "params_before": before, "params_after": after, "params_kept_ratio": after / before,
               "collect_s": run.collect_s, "train_s": run.train_s}
    if tc.eval_windows:
        cache = predictor_training.TargetCache(model, held_out, run.predictors.layer_ids,
                                               tc.block_size)
        metrics = predictor_training.evaluate(run.predictors, cache, range(tc.eval_windows),
                                              tc.keep_ratio)
        sparse = [str(i) for i, r in enumerate(LeMoConfig(block_size=tc.block_size).keep_ratios(
            model_config.n_layers)) if r < 1.0 and str(i) in metrics["recall"]]
        key = f"@{tc.keep_ratio:g}"
        summary.update({
            f"mean_recall{key}": float(np.mean([metrics["recall"][i] for i in sparse])),
            f"mean_recall_all_layers{key}": float(np.mean(list(metrics["recall"].values()))),
            "mean_spearman": float(np.mean([metrics["spearman"][i] for i in sparse])),
            "sparse_layers": [int(i) for i in sparse],
            f"recall{key}": metrics["recall"], "spearman": metrics["spearman"]})
    summary["widths"] = {str(k): v for k, v in run.predictors.widths().items()}
    _write_json(workdir / "summary.json", summary)
    return summary


def set_context(model: Llama, config: ModelConfig) -> None:
    """Point every attention layer at ``config``'s RoPE scaling (weights are unaffected)."""
    model.config = config
    for block in model.layers:
        block.attn.rope_scaling = config.rope_scaling
