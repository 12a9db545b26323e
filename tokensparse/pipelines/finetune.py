"""Long-context LoRA fine-tuning of a pretrained base, dense (``method="lora"``) or with LeMo.

A run is described by a :class:`FinetuneConfig` and resumes from its ``workdir``. The context is
extended with RoPE linear scaling when ``train.seq_len`` exceeds the base's; evaluation is dense
perplexity on validation windows (LeMo's evaluation protocol), and LeMo runs are also scored with the sparse
forward they trained with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import pathlib
from typing import Any

import numpy as np
from flax import nnx

from tokensparse import data, lora, train
from tokensparse.config import DataConfig, LeMoConfig, LoRAConfig, MeshConfig, TrainConfig
from tokensparse.lemo import learned_selector, predictor
from tokensparse.lemo.forward import check_lemo, group_layers, lemo_loss
from tokensparse.loop import train_loop
from tokensparse.pipelines import common
from tokensparse.pipelines.base import check_base, load_base, set_context

FINETUNE_METHODS = ("lora", "lemo")
TUNED_SCHEDULES = ("algorithm1", "sensitivity")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run: the base, the method, the recipe, data and devices."""

    base: str = ""
    """The base model: a pretraining workdir, a Hugging Face directory (config.json +
    *.safetensors), or a tokensparse.zoo name (e.g. smollm2-135m: its own tokenizer is used)."""
    method: str = "lora"
    """lora: dense LoRA fine-tuning; lemo: LoRA with LeMo's contextual token elimination (lemo)."""
    lora: LoRAConfig = LoRAConfig()
    """The adapters every run trains."""
    lemo: LeMoConfig = LeMoConfig()
    """LeMo's options (method=lemo)."""
    predictors: str = ""
    """With lemo.selector=predictor: the predictors/ directory of a train_predictors run."""
    selector_weights: str = ""
    """With lemo.selector=learned: the .npz an experiments.train_selector run wrote for this base.
    Not needed for a zoo base whose weights ship with the library (smollm2-135m); given, it replaces
    them."""
    data: DataConfig = DataConfig()
    """The corpus. The base's own tokenizer encodes it (data.vocab_size is unused); data.tokenizer
    supplies one for a base that ships none."""
    train: TrainConfig = TrainConfig()
    """Optimisation, context (train.seq_len), checkpointing and evaluation cadence."""
    mesh: MeshConfig = MeshConfig(data=1)
    """Device mesh; the default (every axis 1) is one device and no mesh."""
    attention_backend: str = "auto"
    """Attention implementation: auto, or a registered backend (tokensparse.attention.backends())."""
    progress: bool = True
    """Show progress (step, loss, tokens/s, ETA) on stderr."""

    def __post_init__(self):
        common.check(self.method in FINETUNE_METHODS, f"FinetuneConfig.method={self.method!r} must "
                     f"be one of {FINETUNE_METHODS}.")
        if self.method == "lemo":
            common.check(self.train.seq_len % self.lemo.block_size == 0,
                         f"FinetuneConfig.train.seq_len={self.train.seq_len} must be a multiple of "
                         f"FinetuneConfig.lemo.block_size={self.lemo.block_size}: LeMo keeps whole "
                         "blocks.")
            common.check(self.lemo.selector != "predictor" or bool(self.predictors),
                         f"FinetuneConfig.lemo.selector={self.lemo.selector!r} needs "
                         "FinetuneConfig.predictors=DIR (the predictors/ directory of an "
                         "experiments.train_predictors run).")
        common.check(not self.selector_weights or (self.method == "lemo"
                                                   and self.lemo.selector == "learned"),
                     f"FinetuneConfig.selector_weights={self.selector_weights!r} is for "
                     f"method='lemo' with lemo.selector='learned' (this run: method={self.method!r}, "
                     f"lemo.selector={self.lemo.selector!r}).")
        common.check_attention_backend("FinetuneConfig", self.attention_backend)

    @property
    def lemo_config(self) -> LeMoConfig | None:
        """The LeMo config a ``method="lemo"`` run trains with (None for dense LoRA)."""
        return self.lemo if self.method == "lemo" else None

    def replace(self, **changes: Any) -> FinetuneConfig:
        return dataclasses.replace(self, **changes)


def check_paths(config: FinetuneConfig) -> None:
    """The base and the learned-selector weights exist."""
    check_base(config.base)
    common.check(not config.selector_weights or pathlib.Path(config.selector_weights).is_file(),
                 f"FinetuneConfig.selector_weights={config.selector_weights!r} is not a file (an "
                 "experiments.train_selector --out).")


def check(config: FinetuneConfig) -> None:
    """What can be checked without reading weights or data: the base exists, the mesh fits the
    devices and the sequence layout fits the mesh."""
    check_paths(config)
    multiple = config.lemo.block_size if config.method == "lemo" else 1
    common.sequence_layout(config.train, common.make_mesh(config.mesh, "FinetuneConfig"), multiple)


def finetune(config: FinetuneConfig, workdir: str | pathlib.Path) -> dict:
    """LoRA fine-tuning of ``config.base`` at ``config.train.seq_len`` on long-document windows, with
    RoPE linear scaling to the target length when it exceeds the base's context.

    The summary's ``val_*`` keys are the dense evaluation (the LeMo paper's protocol). With
    ``method="lemo"`` the same windows are also scored with the LeMo forward the model was trained
    with (``val_sparse_loss``, ``val_sparse_ppl``, ``val_sparse_tokens``): the train/eval gap.
    Holds the workdir's lock throughout; a resume with other settings is refused before anything is
    written (``train.allow_changed_resume``); a run stopped by SIGTERM / Ctrl-C saves a checkpoint
    and returns ``common.interrupted_summary`` (no evaluation, no ``summary.json``)."""
    tc, lemo_config = config.train, config.lemo_config
    check_paths(config)
    mesh = common.make_mesh(config.mesh, "FinetuneConfig")
    layout = common.sequence_layout(tc, mesh, lemo_config.block_size if lemo_config else 1)
    with common.run_directory(workdir) as workdir:
        return _finetune(config, workdir, mesh, layout)


def _resolved(path: str) -> str:
    """An existing path as an absolute one (the same base however it is spelled); names as given."""
    return str(pathlib.Path(path).resolve()) if path and pathlib.Path(path).exists() else path


def _file_digest(path: str) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:16]


def attach_selection(model, config: FinetuneConfig, model_config) -> None:
    """Attach what ``config.lemo``'s selector reads (predictors, learned-selector weights) and check
    the LeMo run as far as it can be before training: all of it for a fixed schedule, that the
    selector has weights at all for a tuned one (its sparse layers are known only once tuned)."""
    lemo = config.lemo
    if lemo.selector == "predictor":
        predictor.attach(model, predictor.load_predictors(config.predictors, model_config))
    if config.selector_weights:
        learned_selector.attach(model, learned_selector.load(config.selector_weights, model_config))
    if lemo.schedule not in TUNED_SCHEDULES:
        check_lemo(model, lemo, config.train.seq_len, training=False)
    elif lemo.selector == "learned":
        learned_selector.require_attached(model)


def _finetune(config: FinetuneConfig, workdir: pathlib.Path, mesh, layout) -> dict:
    tc, lemo_config = config.train, config.lemo_config
    model, base_config, tokenizer = load_base(config.base, tokenizer=config.data.tokenizer,
                                              attention_backend=config.attention_backend, mesh=mesh)
    corpus = data.load_corpus(config.data.source)
    common.check_vocab(tokenizer, base_config)
    model_config = base_config.with_context(tc.seq_len)
    experiment = common.to_json(config)
    if lemo_config is None:  # LeMo's options do not shape a LoRA run
        experiment.pop("lemo", None)
    built = {"model": model_config.to_dict()}
    paths = {"base": _resolved(config.base), "predictors": _resolved(config.predictors)}
    if config.selector_weights:  # unset, it is not recorded: runs from before it existed resume
        paths["selector_weights"] = _resolved(config.selector_weights)
        built["selector_weights_sha256"] = _file_digest(config.selector_weights)
    else:
        experiment.pop("selector_weights", None)
    if lemo_config is not None:  # everything LeMo needs, checked before the workdir is written
        attach_selection(model, config, model_config)
    resume = common.check_resume(workdir, {**experiment, **paths}, built,
                                 allow=tc.allow_changed_resume, tokenizer=tokenizer, corpus=corpus)
    set_context(model, model_config)
    model.remat, model.remat_names = tc.remat, tc.remat_names
    lora.add_lora(model, config.lora, rngs=nnx.Rngs(tc.seed))

    train_docs = data.encode_documents(tokenizer, corpus.train)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    data.check_tokens(np.concatenate(train_docs + val_docs), model_config.vocab_size)
    batches = data.WindowBatches(train_docs, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                 seed=tc.seed)
    eval_batches = list(itertools.islice(data.eval_windows(val_docs, seq_len=tc.seq_len),
                                         tc.eval_batches))
    common.save_tokenizer(tokenizer, workdir)
    common.write_json(workdir / "config.json", {"experiment": experiment, **built})
    common.record_run(workdir, resume)

    def loss_fn(model, batch):  # evaluation is always dense (the LeMo paper's protocol)
        return train.lm_loss(model, batch, loss_segment=tc.loss_segment)

    if lemo_config is not None and lemo_config.schedule in TUNED_SCHEDULES:
        lemo_config = tune_lemo_profile(model, lemo_config, train_docs, tc, workdir)
    if lemo_config is not None:  # each run of identical layers scans over its own group
        group_layers(model, lemo_config)
    optimizer = nnx.Optimizer(model, train.make_optimizer(tc), wrt=lora.LoRAParam)

    def train_loss_fn(model, batch):
        if lemo_config is None:
            return train.lm_loss(model, batch, loss_segment=tc.loss_segment, layout=layout)
        return lemo_loss(model, batch, lemo=lemo_config, loss_segment=tc.loss_segment, layout=layout)

    if lemo_config is not None:
        check_lemo(model, lemo_config, tc.seq_len)
    step_fn = train.make_train_step(train_loss_fn, wrt=lora.LoRAParam,
                                    grad_accum_steps=tc.grad_accum_steps)
    evaluate = common.eval_fn(eval_batches, loss_fn)
    with common.on_mesh(mesh, model, optimizer, batches) as batches:
        result = train_loop(workdir=workdir, model=model, optimizer=optimizer, train_step=step_fn,
                            batches=batches, tc=tc, wrt=lora.LoRAParam,
                            metadata={**built, "experiment": experiment},
                            eval_fn=evaluate, progress=config.progress)
        if result.interrupted:
            return common.interrupted_summary(result.step, result.signal)
        summary = common.run_summary(model, optimizer, step_fn, batches.batch(0), result,
                                     evaluate(model))
        if lemo_config is not None:
            sparse = common.eval_fn(eval_batches, train_loss_fn)(model)
            summary.update({f"val_sparse_{k}": v for k, v in sparse.items()})
    common.write_json(workdir / "summary.json", summary)
    return summary


def tune_lemo_profile(model, lemo_config: LeMoConfig, train_docs, tc: TrainConfig,
                      workdir: pathlib.Path) -> LeMoConfig:
    """Algorithm 1, or the loss-budgeted sensitivity profile, on calibration windows of the train
    split (their own seed, batch 1); the profile is written to ``workdir/lemo_profile.json`` with
    what produced it, and reused when resuming. Returns ``lemo_config`` with that profile."""
    path = workdir / "lemo_profile.json"
    if path.exists():
        profile = tuple(json.loads(path.read_text())["profile"])
    else:
        windows = data.WindowBatches(train_docs, batch_size=1, seq_len=tc.seq_len, seed=tc.seed + 1)
        calibration = [windows.batch(i) for i in range(lemo_config.calibration_windows)]
        if lemo_config.schedule == "algorithm1":
            from tokensparse.lemo.profiles.algorithm1 import tune_thresholds

            tuned = tune_thresholds(model, calibration, lemo_config, rounds=lemo_config.tune_rounds)
            record = {"thresholds": tuned.thresholds, "profile": tuned.profile,
                      "history": tuned.history}
        else:
            from tokensparse.lemo.profiles.sensitivity import tune_profile

            record = dataclasses.asdict(tune_profile(model, calibration, lemo_config,
                                                     keep_ratio=lemo_config.keep_ratio,
                                                     budget=lemo_config.loss_budget))
        profile = tuple(record["profile"])
        common.write_json(path, {"schedule": lemo_config.schedule, **record})
    return lemo_config.replace(schedule="profile", profile=profile)
