"""Pretraining from scratch on packed documents: a Llama-family model, or a SUBLLM or its dense twin.

A run is described by a :class:`PretrainConfig` and resumes from its ``workdir``. A plain Llama is
exported to ``workdir/hf`` as a fine-tuning base; a SUBLLM is evaluated in each of
``config.subllm.eval_modes`` and its summary reports per-subsampler routing statistics.
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx

from tokensparse import data, hf, sharding, train
from tokensparse.config import DataConfig, MeshConfig, ModelConfig, TrainConfig
from tokensparse.llama import Llama
from tokensparse.loop import train_loop
from tokensparse.pipelines import common
from tokensparse.subllm import decode as subllm_decode
from tokensparse.subllm import training as subllm_training
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import SubLLMConfig


@dataclasses.dataclass(frozen=True)
class SubLLMTrainConfig:
    """How a SUBLLM is trained and evaluated, beyond the shared :class:`TrainConfig` recipe."""

    scorer_lr_scale: float = 0.5
    """The scorers' learning rate is the run's times this (the spec's: halved)."""
    scorer_warmup: bool = True
    """The scorers' learning rate warms up with the rest (the spec's); False runs them at the peak
    rate from step 0."""
    schedule_step_multiplier: float = 1.0
    """Balancer and bypass schedules see the step times this (icefall's duration-adjusted batch count)."""
    eval_modes: tuple[str, ...] = ("infer", "topk")
    """Evaluation modes, the first one's loss reported as val_loss, the others as val_<mode>_loss:
    infer (threshold selection, causal) and topk (deterministic top-k at the training capacity)."""

    def __post_init__(self):
        common.check(self.scorer_lr_scale > 0, f"SubLLMTrainConfig.scorer_lr_scale="
                     f"{self.scorer_lr_scale} must be positive.")
        common.check(self.schedule_step_multiplier > 0, "SubLLMTrainConfig.schedule_step_multiplier="
                     f"{self.schedule_step_multiplier} must be positive.")
        modes = self.eval_modes
        common.check(bool(modes) and not set(modes) - set(subllm_training.EVAL_MODES),
                     f"SubLLMTrainConfig.eval_modes={modes!r} must be a non-empty subset of "
                     f"{subllm_training.EVAL_MODES}.")


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """A pretraining run: the model, its training recipe, data and devices."""

    model: ModelConfig | SubLLMConfig
    """A ModelConfig (a plain Llama, exported to workdir/hf as a fine-tuning base) or a SubLLMConfig
    (a SUBLLM; tokensparse.subllm.dense_twin(config) for its dense twin)."""
    train: TrainConfig = TrainConfig()
    """Optimisation, schedule, checkpointing and evaluation cadence."""
    data: DataConfig = DataConfig()
    """The corpus and the tokenizer trained on it."""
    subllm: SubLLMTrainConfig = SubLLMTrainConfig()
    """A SUBLLM's own training and evaluation options (unused for a plain Llama)."""
    vocab_from_tokenizer: bool = True
    """The model's vocab_size becomes the tokenizer's vocabulary size; False keeps the model's own,
    which must be at least the tokenizer's."""
    mesh: MeshConfig = MeshConfig(data=1)
    """Device mesh; the default (every axis 1) is one device and no mesh."""
    attention_backend: str = "auto"
    """Attention implementation: auto, or a registered backend (tokensparse.attention.backends())."""
    progress: bool = True
    """Show progress (step, loss, tokens/s, ETA) on stderr."""

    def __post_init__(self):
        common.check(isinstance(self.model, ModelConfig | SubLLMConfig), "PretrainConfig.model must "
                     f"be a ModelConfig or a SubLLMConfig, got {type(self.model).__name__}.")
        common.check_attention_backend("PretrainConfig", self.attention_backend)
        positions = self.model_config.max_positions
        common.check(self.train.seq_len <= positions,
                     f"PretrainConfig.train.seq_len={self.train.seq_len} must be <= the model's "
                     f"max_positions={positions} (pretraining does not stretch RoPE; raise the model's "
                     "max_positions or shorten seq_len).")

    @property
    def kind(self) -> str:
        """``"llama"``, ``"subllm"``, or ``"dense"`` (a SubLLMConfig without subsamplers)."""
        if isinstance(self.model, ModelConfig):
            return "llama"
        return "subllm" if self.model.parsed.n_subsamplers else "dense"

    @property
    def model_config(self) -> ModelConfig:
        """The dense backbone's config."""
        return self.model if isinstance(self.model, ModelConfig) else self.model.model

    def replace(self, **changes: Any) -> PretrainConfig:
        return dataclasses.replace(self, **changes)


def check(config: PretrainConfig) -> None:
    """What can be checked without data: the mesh fits the devices and the sequence layout fits it."""
    common.sequence_layout(config.train, common.make_mesh(config.mesh, "PretrainConfig"))


@dataclasses.dataclass
class PretrainSetup:
    """What :func:`pretrain` trains: the model, its optimizer and losses, and the run metadata."""

    model: nnx.Module
    model_config: ModelConfig
    metadata: dict
    tx: Any
    train_loss: Any
    pass_step: bool
    eval_losses: dict  # name prefix ("" for the main one) -> loss_fn(model, batch)


def _with_vocab(config: PretrainConfig, vocab_size: int | None) -> ModelConfig | SubLLMConfig:
    if vocab_size is None or not config.vocab_from_tokenizer:
        return config.model
    if isinstance(config.model, ModelConfig):
        return config.model.replace(vocab_size=vocab_size)
    return config.model.replace(model=config.model.model.replace(vocab_size=vocab_size))


def llama_setup(config: PretrainConfig, vocab_size: int | None, tc: TrainConfig,
                layout=None) -> PretrainSetup:
    """A plain Llama from ``config.model`` (vocab_size from the tokenizer unless told otherwise)."""
    model_config = _with_vocab(config, vocab_size)
    model = Llama(model_config, attention_backend=config.attention_backend, remat=tc.remat,
                  remat_names=tc.remat_names, rngs=nnx.Rngs(tc.seed))

    def loss_fn(model, batch):
        return train.lm_loss(model, batch, loss_segment=tc.loss_segment)

    def train_loss_fn(model, batch):
        return train.lm_loss(model, batch, loss_segment=tc.loss_segment, layout=layout)

    return PretrainSetup(model, model_config, {"model": model_config.to_dict()},
                         train.make_optimizer(tc), train_loss_fn, False, {"": loss_fn})


def subllm_setup(config: PretrainConfig, vocab_size: int | None, tc: TrainConfig,
                 layout=None) -> PretrainSetup:
    """SUBLLM or its dense twin: the same backbone init (same seed), the same recipe and data.

    Other experiments use it to train exactly what :func:`pretrain` trains."""
    sub: SubLLMConfig = _with_vocab(config, vocab_size)
    options, kind = config.subllm, config.kind
    model = SubLLM(sub, attention_backend=config.attention_backend, remat=tc.remat,
                   remat_names=tc.remat_names, rngs=nnx.Rngs(tc.seed))
    tx = subllm_training.make_optimizer(tc, scorer_lr_scale=options.scorer_lr_scale,
                                        scorer_warmup=options.scorer_warmup)
    loss_fn = subllm_training.train_loss(seed=tc.seed, loss_segment=tc.loss_segment,
                                         step_multiplier=options.schedule_step_multiplier,
                                         layout=layout)
    modes = list(options.eval_modes)
    if kind == "dense":
        modes = modes[:1]  # without subsamplers every mode is the same computation
    evals = {("" if i == 0 else f"{m}_"): subllm_training.eval_loss(m, loss_segment=tc.loss_segment)
             for i, m in enumerate(modes)}
    metadata = {"model": sub.model.to_dict(), "subllm": {
        "kind": kind, "structure": sub.structure,
        "keep": sub.keep if isinstance(sub.keep, float) else list(sub.keep),
        "route_shards": sub.route_shards, "balancer_statistic": sub.balancer_statistic,
        "balancer_margin": sub.balancer_margin, "bypass_init": sub.bypass_init,
        "balancer_start_scale": sub.balancer_start_scale,
        "balancer_start_steps": sub.balancer_start_steps, "discard_penalty": sub.discard_penalty,
        "infer_threshold": sub.infer_threshold,
        "infer_capacity": sub.infer_capacity, "level_positions": sub.level_positions}}
    if not options.scorer_warmup:  # another optimiser-state tree: a resume across the change fails
        metadata["subllm"]["scorer_warmup"] = False  # clearly (absent when on: older runs resume)
    return PretrainSetup(model, sub.model, metadata, tx, loss_fn, True, evals)


def pretrain(config: PretrainConfig, workdir: str | pathlib.Path) -> dict:
    """Pretrain ``config.model`` from scratch on packed documents; resumes from ``workdir``.

    Writes ``config.json``, ``fingerprint.json``, ``metrics.jsonl``, ``checkpoints/``,
    ``tokenizer.json``, and when the run reaches ``train.steps``, ``summary.json`` and (a plain
    Llama) ``hf/`` (the fine-tuning base). Returns the summary; a run stopped by SIGTERM / Ctrl-C
    saves a checkpoint and returns ``common.interrupted_summary`` instead. Holds the workdir's lock
    throughout; a resume with other settings is refused before anything is written
    (``train.allow_changed_resume``)."""
    tc = config.train
    mesh = common.make_mesh(config.mesh, "PretrainConfig")
    layout = common.sequence_layout(tc, mesh)
    with common.run_directory(workdir) as workdir:
        return _pretrain(config, workdir, mesh, layout)


def _pretrain(config: PretrainConfig, workdir: pathlib.Path, mesh, layout) -> dict:
    tc = config.train
    corpus, tokenizer = common.prepare_data(config.data)
    vocab = tokenizer.get_vocab_size()
    setup = (llama_setup if config.kind == "llama" else subllm_setup)(config, vocab, tc, layout)
    model_config = setup.model_config
    common.check_vocab(tokenizer, model_config)
    experiment = common.to_json(config)
    tracked = {k: v for k, v in experiment.items() if not (k == "subllm" and config.kind == "llama")}
    resume = common.check_resume(workdir, tracked, setup.metadata, allow=tc.allow_changed_resume,
                                 tokenizer=tokenizer, corpus=corpus)
    train_docs = data.encode_documents(tokenizer, corpus.train)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    data.check_tokens(np.concatenate(train_docs + val_docs), model_config.vocab_size)
    batches = data.PackedBatches(train_docs, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                 seed=tc.seed)
    val = data.PackedBatches(val_docs, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=0)
    eval_batches = [val.batch(i) for i in range(min(tc.eval_batches, val.steps_per_epoch))]
    common.save_tokenizer(tokenizer, workdir)
    common.write_json(workdir / "config.json", {"experiment": experiment, **setup.metadata})
    common.record_run(workdir, resume)

    model = setup.model
    optimizer = nnx.Optimizer(model, setup.tx, wrt=nnx.Param)
    step_fn = train.make_train_step(setup.train_loss, pass_step=setup.pass_step,
                                    grad_accum_steps=tc.grad_accum_steps)
    evaluate = common.evaluate_all(eval_batches, setup.eval_losses)
    with common.on_mesh(mesh, model, optimizer, batches) as batches:
        result = train_loop(workdir=workdir, model=model, optimizer=optimizer, train_step=step_fn,
                            batches=batches, tc=tc, metadata={**setup.metadata, "experiment": experiment},
                            eval_fn=evaluate, progress=config.progress)
        if result.interrupted:
            return common.interrupted_summary(result.step, result.signal)
        summary = common.run_summary(model, optimizer, step_fn, batches.batch(0), result,
                                     evaluate(model))
    summary["unigram_entropy"] = common.unigram_entropy(train_docs)
    if config.kind == "llama":  # fine-tuning's base: one writer, once every process reads it whole
        if mesh is not None and jax.process_count() > 1:
            sharding.to_local(model, mesh=mesh)
        if jax.process_index() == 0:
            hf.save_llama(model, model_config, workdir / "hf", tokenizer=tokenizer)
    elif model.structure.n_subsamplers:
        summary["subllm"] = subllm_stats(model, eval_batches[0])
        warn_shut_subsamplers(summary["subllm"])
    common.write_json(workdir / "summary.json", summary)
    sharding.barrier("pretrain finished")  # no process moves on before process 0 has written
    return summary


def subllm_stats(model: SubLLM, batch) -> dict:
    """Per subsampler: the fraction of positive scores (the Balancer's target band is keep ± 0.05),
    the threshold-mode keep rate, and the mean bypass scale c. A subsampler that receives no token (an
    outer one kept none) keeps none: keep rate 0.0, and its fraction is None (it scored nothing)."""
    _, aux = nnx.jit(lambda m, b: m.forward(b.tokens, b.positions, b.segment_ids, mode="infer"))(model, batch)
    group_segments = [batch.segment_ids, *aux["segment_ids"]]  # group j + 1 is subsampler j's level
    parents = subllm_decode.parent_groups(model.structure)
    out = {}
    for j, scores in enumerate(aux["scores"]):
        valid = np.asarray(group_segments[parents[j]]) >= 0  # the level subsampler j scored
        s, received = np.asarray(scores)[valid], int(valid.sum())
        out[f"positive_fraction_{j}"] = float((s > 0).mean()) if received else None
        out[f"keep_rate_{j}"] = float(np.asarray(aux["selections"][j].valid).sum() / max(received, 1))
        out[f"bypass_c_{j}"] = float(np.asarray(model.bypasses[j].scale[...]).mean())
    return out


def warn_shut_subsamplers(stats: dict) -> list[int]:
    """Warn about (and return) the subsamplers that keep no token in threshold mode: inference then
    skips their inner levels entirely, so the model is effectively the one without them."""
    shut = sorted(int(k.removeprefix("keep_rate_")) for k, v in stats.items()
                  if k.startswith("keep_rate_") and v == 0.0)
    if shut:
        warnings.warn(f"SUBLLM subsampler(s) {shut} keep no token in threshold mode (every score <= "
                      "threshold): inference skips their inner levels. Short, high-lr runs often shut "
                      "a level; see docs/subllm.md, 'What the Balancer can and cannot hold'.",
                      RuntimeWarning, stacklevel=2)
    return shut
