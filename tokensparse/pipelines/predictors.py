"""Training LeMo's pattern predictors for a frozen base, and scoring them on held-out windows.

A run is described by a :class:`PredictorsConfig` and resumes from its ``workdir``; the trained
predictors land in ``workdir/predictors`` (fine-tuning loads them with ``FinetuneConfig.predictors``).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from tokensparse import data
from tokensparse.checkpoint import InterruptGuard
from tokensparse.config import DataConfig, ModelConfig
from tokensparse.lemo import predictor_metrics, predictor_training
from tokensparse.lemo.predictor_training import PredictorTrainConfig
from tokensparse.loop import truncate_log
from tokensparse.pipelines import common
from tokensparse.pipelines.base import check_base, load_base, set_context


@dataclasses.dataclass(frozen=True)
class PredictorsConfig:
    """A predictor-training run: the frozen base, the training recipe and the data."""

    base: str = ""
    """The frozen base: a pretraining workdir, a Hugging Face directory, or a tokensparse.zoo name."""
    train: PredictorTrainConfig = PredictorTrainConfig()
    """How the predictors are trained, pruned and scored (train.seq_len: the context, RoPE-scaled
    as fine-tuning will scale it)."""
    data: DataConfig = DataConfig()
    """The corpus. The base's own tokenizer encodes it (data.vocab_size is unused); data.tokenizer
    supplies one for a base that ships none."""
    attention_backend: str = "auto"
    """Attention implementation: auto, or a registered backend (tokensparse.attention.backends())."""
    progress: bool = True
    """Show progress (step, loss, ETA) on stderr."""

    def __post_init__(self):
        common.check_attention_backend("PredictorsConfig", self.attention_backend)

    def replace(self, **changes: Any) -> PredictorsConfig:
        return dataclasses.replace(self, **changes)


def check(config: PredictorsConfig) -> None:
    """What can be checked without reading weights: the base exists."""
    check_base(config.base)


def predictor_setup(config: PredictorsConfig):
    """``(model, model_config, train_windows, held_out)`` of a predictor run: the frozen base at
    ``config.train.seq_len`` (RoPE scaled), and the train / validation windows it trains and is
    scored on."""
    return _setup(config)[:4]


def _setup(config: PredictorsConfig):
    """:func:`predictor_setup`'s values, then the tokenizer and the corpus."""
    tc = config.train
    model, base_config, tokenizer = load_base(config.base, tokenizer=config.data.tokenizer,
                                              attention_backend=config.attention_backend)
    corpus = data.load_corpus(config.data.source)
    common.check_vocab(tokenizer, base_config)
    model_config = base_config.with_context(tc.seq_len)
    set_context(model, model_config)
    train_docs = data.encode_documents(tokenizer, corpus.train)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    train_windows = data.WindowBatches(train_docs, batch_size=1, seq_len=tc.seq_len, seed=tc.seed)
    held_out = data.WindowBatches(val_docs, batch_size=1, seq_len=tc.seq_len, seed=tc.seed + 1)
    return model, model_config, train_windows, held_out, tokenizer, corpus


def predictor_sparse_layers(config: ModelConfig, tc: PredictorTrainConfig, scored) -> list[str]:
    """The default LeMo schedule's sparse layers among those in ``scored`` (keys are str(layer)):
    the layers the recall summaries average over."""
    return [str(i) for i in tc.default_sparse_layers(config.n_layers) if str(i) in scored]


def train_predictors(config: PredictorsConfig, workdir: str | pathlib.Path) -> dict:
    """Train LeMo predictors for the frozen ``config.base`` on train-split windows; report held-out
    recall and Spearman.

    Writes ``workdir/predictors``, ``config.json``, ``fingerprint.json``, ``metrics.jsonl``,
    ``summary.json``; resumes from ``workdir/checkpoints``. Holds the workdir's lock throughout; a
    resume with other settings is refused before anything is written. A run stopped by SIGTERM /
    Ctrl-C saves a checkpoint and returns ``common.interrupted_summary`` (no predictors export, no
    scoring, no ``summary.json``)."""
    check_base(config.base)
    with common.run_directory(workdir) as workdir:
        return _train_predictors(config, workdir)


def _train_predictors(config: PredictorsConfig, workdir: pathlib.Path) -> dict:
    tc = config.train
    model, model_config, train_windows, held_out, tokenizer, corpus = _setup(config)
    experiment = common.to_json(config)
    base = str(pathlib.Path(config.base).resolve()) if pathlib.Path(config.base).exists() else config.base
    built = {"model": model_config.to_dict()}
    resume = common.check_resume(workdir, {**experiment, "base": base}, built, allow=None,
                                 tokenizer=tokenizer, corpus=corpus)
    common.write_json(workdir / "config.json", {"experiment": experiment, **built})
    common.record_run(workdir, resume)
    truncate_log(workdir / "metrics.jsonl", resume.step or 0)
    InterruptGuard.last_signal = None
    run = predictor_training.train_predictors(model, train_windows, tc, workdir,
                                              metadata={"base": str(config.base)},
                                              progress=config.progress)
    if run.interrupted:
        return common.interrupted_summary(run.step, InterruptGuard.last_signal)
    before, after = run.params_before, run.predictors.num_params()
    summary = {"steps": run.step, "interrupted": run.interrupted,
               "train_loss": run.history[-1]["loss"] if run.history else None,
               "params_before": before, "params_after": after, "params_kept_ratio": after / before,
               "collect_s": run.collect_s, "train_s": run.train_s}
    if tc.eval_windows:
        cache = predictor_training.TargetCache(
            model, held_out, run.predictors.layer_ids, tc.block_size,
            directory=predictor_training.targets_directory(tc, workdir) / "held_out")
        metrics = predictor_metrics.evaluate(run.predictors, cache, range(tc.eval_windows),
                                              tc.keep_ratio)
        sparse = predictor_sparse_layers(model_config, tc, metrics["recall"])
        key = f"@{tc.keep_ratio:g}"
        summary.update({
            f"mean_recall{key}": float(np.mean([metrics["recall"][i] for i in sparse])),
            f"mean_recall_all_layers{key}": float(np.mean(list(metrics["recall"].values()))),
            "mean_spearman": float(np.mean([metrics["spearman"][i] for i in sparse])),
            "sparse_layers": [int(i) for i in sparse],
            f"recall{key}": metrics["recall"], "spearman": metrics["spearman"]})
    summary["widths"] = {str(k): v for k, v in run.predictors.widths().items()}
    common.write_json(workdir / "summary.json", summary)
    return summary
