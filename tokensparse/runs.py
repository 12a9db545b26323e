"""Experiment runs built from ``ml_collections`` configs: pretraining, LoRA fine-tuning and LeMo
predictor training.

The absl scripts in ``experiments/`` only parse flags and call these. Every config value is
validated here *before* anything is compiled, with errors that name the config key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import math
import pathlib
import warnings
from typing import Any

import jax
import numpy as np
from flax import nnx
from ml_collections import config_dict

from tokensparse import data, hf, lora, sharding, train, zoo
from tokensparse.config import LeMoConfig, LoRAConfig, MeshConfig, ModelConfig, TrainConfig, preset
from tokensparse.lemo import predictor, predictor_training
from tokensparse.lemo.model import check_lemo, lemo_loss
from tokensparse.lemo.predictor_training import PredictorTrainConfig
from tokensparse.llama import Llama
from tokensparse.loop import LoopResult, check_resumable, train_loop
from tokensparse.metrics import compiled_memory
from tokensparse.subllm import decode as subllm_decode
from tokensparse.subllm import training as subllm_training
from tokensparse.subllm.model import SubLLM
from tokensparse.subllm.structure import SubLLMConfig, dense_twin, subllm_preset

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


def mesh_config_dict(**changes: Any) -> config_dict.ConfigDict:
    """``config.mesh``: MeshConfig axis sizes. The default (all 1) is one device and no mesh."""
    return config_dict.ConfigDict(dataclasses.asdict(MeshConfig(data=1).replace(**changes)))


def build_mesh(c: config_dict.ConfigDict):
    """The run's mesh from ``config.mesh`` (None when absent or a single device)."""
    if "mesh" not in c:
        return None
    mesh_config = _dataclass_from(MeshConfig, c.mesh.to_dict(), "config.mesh")
    try:
        shape = mesh_config.shape(jax.device_count())
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None
    if math.prod(shape) == 1:
        return None
    return sharding.make_mesh(mesh_config)


@contextlib.contextmanager
def _on_mesh(mesh, model, optimizer, batches):
    """Inside: the mesh is set, model and optimizer state are placed per the sharding rules, and the
    yielded batch source feeds global arrays. Without a mesh, all of that is left as is."""
    if mesh is None:
        yield batches
        return
    with jax.set_mesh(mesh):
        sharding.shard(model, optimizer, mesh=mesh)
        yield sharding.ShardedBatches(batches, mesh)


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


FINETUNE_METHODS = ("lora", "lemo")


def build_finetune_method(c: config_dict.ConfigDict) -> tuple[LoRAConfig, LeMoConfig | None]:
    """The fine-tuning run's LoRA config and, for ``method="lemo"``, its LeMo config."""
    if c.method not in FINETUNE_METHODS:
        raise ValueError(f"config.method={c.method!r} must be one of {FINETUNE_METHODS}.")
    try:
        lora_config = LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                                 targets=tuple(c.lora.targets))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.lora: {e}") from None
    return lora_config, build_lemo_config(c.lemo) if c.method == "lemo" else None


def build_model_config(c: config_dict.ConfigDict, *, vocab_size: int | None = None) -> ModelConfig:
    overrides = {k: v for k, v in c.overrides.to_dict().items() if v is not None}
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    try:
        return preset(c.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.model: {e}") from None


def _write_json(path: pathlib.Path, obj: Any) -> None:
    if jax.process_index() != 0:  # one writer when several processes share the workdir
        return
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


def subllm_config_dict(preset_name: str = "subllm-small", **changes: Any) -> config_dict.ConfigDict:
    """``config.subllm`` for SUBLLM pretraining (``config.model = "subllm" | "dense"``): the preset,
    its routing options, the scorer's learning-rate scale, the schedule step multiplier and the
    evaluation modes; ``overrides`` replaces backbone fields as for ``config.model``. ``keep`` is
    every level's ratio unless ``level_keep`` lists one per level (outermost first), e.g.
    ``--config.subllm.level_keep="[0.64, 0.5]"``."""
    base = subllm_preset(preset_name)
    values = {"preset": preset_name, "structure": base.structure,
              "keep": base.keep if isinstance(base.keep, float) else float(base.keep[0]),
              "discard_penalty": base.discard_penalty, "infer_threshold": base.infer_threshold,
              "infer_capacity": base.infer_capacity, "level_positions": base.level_positions,
              "level_keep": [] if isinstance(base.keep, float) else list(base.keep),
              "route_shards": base.route_shards, "balancer_statistic": base.balancer_statistic,
              "balancer_margin": base.balancer_margin, "bypass_init": base.bypass_init,
              "balancer_start_scale": base.balancer_start_scale,
              "balancer_start_steps": base.balancer_start_steps, "scorer_lr_scale": 0.5,
              "scorer_warmup": True, "schedule_step_multiplier": 1.0, "eval_modes": ["infer", "topk"]}
    overrides = changes.pop("overrides", {})
    unknown = set(changes) - set(values)
    if unknown:
        raise ValueError(f"subllm_config_dict: unknown keys {sorted(unknown)}.")
    values.update(changes)
    c = config_dict.ConfigDict(values)
    c.overrides = model_config_dict(preset_name, **overrides).overrides
    return c


MODEL_KINDS = ("subllm", "dense")


def build_subllm_config(c: config_dict.ConfigDict, kind: str, *, vocab_size: int | None = None
                        ) -> SubLLMConfig:
    """The SUBLLM of ``config.subllm``, or its dense twin for ``kind="dense"``."""
    _check_kind(kind)
    values = c.to_dict()
    overrides = {k: v for k, v in values.pop("overrides").items() if v is not None}
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    name = values.pop("preset")
    for key in ("scorer_lr_scale", "scorer_warmup", "schedule_step_multiplier", "eval_modes"):
        values.pop(key)
    level_keep = values.pop("level_keep")
    if level_keep:
        values["keep"] = tuple(level_keep)
    try:
        base = subllm_preset(name)
        config = base.replace(model=base.model.replace(**overrides), **values)
    except (ValueError, TypeError) as e:
        raise ValueError(f"config.subllm: {e}") from None
    return dense_twin(config) if kind == "dense" else config


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"config.model={kind!r} must be one of {MODEL_KINDS} (SUBLLM or its dense "
                         "twin), or a {preset, overrides} dict for a plain Llama.")


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


def sequence_layout(tc: TrainConfig, mesh, multiple: int = 1):
    """The training loss's ``layout`` for ``tc.seq_layout`` on ``mesh`` (None: keep array order)."""
    if tc.seq_layout != "zigzag" or mesh is None or mesh.shape["seq"] == 1:
        return None
    shards = mesh.shape["seq"]
    sharding.zigzag_order(tc.seq_len, shards, multiple)  # fail now, before compiling, if it can't
    return functools.partial(sharding.zigzag_order, shards=shards, multiple=multiple)


def _llama_setup(c, vocab_size: int, tc: TrainConfig, layout=None) -> PretrainSetup:
    model_config = build_model_config(c.model, vocab_size=vocab_size)
    model = Llama(model_config, attention_backend=c.attention_backend, remat=tc.remat,
                  remat_names=tc.remat_names, rngs=nnx.Rngs(tc.seed))

    def loss_fn(model, batch):
        return train.lm_loss(model, batch, loss_segment=tc.loss_segment)

    def train_loss_fn(model, batch):
        return train.lm_loss(model, batch, loss_segment=tc.loss_segment, layout=layout)

    return PretrainSetup(model, model_config, {"model": model_config.to_dict()}, train.make_optimizer(tc),
                          train_loss_fn, False, {"": loss_fn})


def subllm_setup(c, kind: str, vocab_size: int, tc: TrainConfig, layout=None) -> PretrainSetup:
    """SUBLLM or its dense twin: the same backbone init (same seed), the same recipe and data.

    ``c`` is a pretraining config (``config.subllm``, ``config.attention_backend``); ``kind`` is
    ``"subllm"`` or ``"dense"``. Other experiments use it to train exactly what pretraining trains.
    """
    if "subllm" not in c:
        raise ValueError(f"config.model={kind!r} needs config.subllm (see runs.subllm_config_dict).")
    config = build_subllm_config(c.subllm, kind, vocab_size=vocab_size)
    s = c.subllm
    modes = list(s.eval_modes)
    if not modes or set(modes) - set(subllm_training.EVAL_MODES):
        raise ValueError(f"config.subllm.eval_modes={modes} must be a non-empty subset of "
                         f"{subllm_training.EVAL_MODES}.")
    model = SubLLM(config, attention_backend=c.attention_backend, remat=tc.remat,
                   remat_names=tc.remat_names, rngs=nnx.Rngs(tc.seed))
    try:
        tx = subllm_training.make_optimizer(tc, scorer_lr_scale=s.scorer_lr_scale,
                                            scorer_warmup=bool(s.scorer_warmup))
        loss_fn = subllm_training.train_loss(seed=tc.seed, loss_segment=tc.loss_segment,
                                             step_multiplier=s.schedule_step_multiplier, layout=layout)
    except ValueError as e:
        raise ValueError(f"config.subllm: {e}") from None
    if kind == "dense":
        modes = modes[:1]  # without subsamplers every mode is the same computation
    evals = {("" if i == 0 else f"{m}_"): subllm_training.eval_loss(m, loss_segment=tc.loss_segment)
             for i, m in enumerate(modes)}
    metadata = {"model": config.model.to_dict(), "subllm": {
        "kind": kind, "structure": config.structure,
        "keep": config.keep if isinstance(config.keep, float) else list(config.keep),
        "route_shards": config.route_shards, "balancer_statistic": config.balancer_statistic,
        "balancer_margin": config.balancer_margin, "bypass_init": config.bypass_init,
        "balancer_start_scale": config.balancer_start_scale,
        "balancer_start_steps": config.balancer_start_steps, "discard_penalty": config.discard_penalty,
        "infer_threshold": config.infer_threshold,
        "infer_capacity": config.infer_capacity, "level_positions": config.level_positions}}
    if not s.scorer_warmup:  # another optimiser-state tree: a resume across the change fails clearly
        metadata["subllm"]["scorer_warmup"] = False  # (absent when on, so older runs still resume)
    return PretrainSetup(model, config.model, metadata, tx, loss_fn, True, evals)


def _evaluate_all(eval_batches, losses: dict):
    """One evaluation function over several loss functions; keys prefixed per loss."""
    fns = {prefix: _eval_fn(eval_batches, fn) for prefix, fn in losses.items()}
    return lambda model: {f"{prefix}{k}": v for prefix, fn in fns.items() for k, v in fn(model).items()}


def pretrain(c: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Pretrain a model from scratch on packed documents; resumes from ``workdir`` if possible.

    ``config.model`` is a ``{preset, overrides}`` dict (a plain Llama, exported to ``workdir/hf`` as a
    fine-tuning base) or ``"subllm"`` / ``"dense"``: the SUBLLM of ``config.subllm`` or its dense
    twin, trained with the same recipe and evaluated in each of ``config.subllm.eval_modes``.
    """
    workdir = pathlib.Path(workdir)
    tc = build_train_config(c.train)
    mesh = build_mesh(c)
    kind = c.model if isinstance(c.model, str) else None
    if kind is not None:
        _check_kind(kind)
    workdir.mkdir(parents=True, exist_ok=True)
    corpus, tokenizer = _prepare_data(c, workdir)
    vocab = tokenizer.get_vocab_size()
    layout = sequence_layout(tc, mesh)
    setup = (_llama_setup(c, vocab, tc, layout) if kind is None
             else subllm_setup(c, kind, vocab, tc, layout))
    model_config = setup.model_config
    _check_vocab(tokenizer, model_config)
    check_resumable(workdir, setup.metadata)
    train_docs = data.encode_documents(tokenizer, corpus.train)
    val_docs = data.encode_documents(tokenizer, corpus.validation)
    data.check_tokens(np.concatenate(train_docs + val_docs), model_config.vocab_size)
    batches = data.PackedBatches(train_docs, batch_size=tc.batch_size, seq_len=tc.seq_len,
                                 seed=tc.seed)
    val = data.PackedBatches(val_docs, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=0)
    eval_batches = [val.batch(i) for i in range(min(tc.eval_batches, val.steps_per_epoch))]
    _write_json(workdir / "config.json", {"experiment": c.to_dict(), **setup.metadata})

    model = setup.model
    optimizer = nnx.Optimizer(model, setup.tx, wrt=nnx.Param)
    step_fn = train.make_train_step(setup.train_loss, pass_step=setup.pass_step)
    evaluate = _evaluate_all(eval_batches, setup.eval_losses)
    with _on_mesh(mesh, model, optimizer, batches) as batches:
        result = train_loop(workdir=workdir, model=model, optimizer=optimizer, train_step=step_fn,
                            batches=batches, tc=tc,
                            metadata={**setup.metadata, "experiment": c.to_dict()},
                            eval_fn=evaluate, progress=c.progress)
        summary = _summary(model, optimizer, step_fn, batches.batch(0), result, evaluate(model))
    summary["unigram_entropy"] = unigram_entropy(train_docs)
    if kind is None:
        hf.save_llama(model, model_config, workdir / "hf")  # the base for fine-tuning
    elif model.structure.n_subsamplers:
        summary["subllm"] = subllm_stats(model, eval_batches[0])
        warn_shut_subsamplers(summary["subllm"])
    _write_json(workdir / "summary.json", summary)
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


def check_base(base: str) -> None:
    """Raise ``ValueError`` unless ``base`` is an existing path or a zoo name (no weights read)."""
    if not base:
        raise ValueError("config.base is empty: point it at a pretraining --workdir, a Hugging "
                         f"Face directory (config.json + *.safetensors) or a zoo model "
                         f"({', '.join(sorted(zoo.MODELS))}).")
    if not pathlib.Path(base).exists() and base not in zoo.MODELS:
        raise ValueError(f"config.base={base!r} is neither an existing directory nor a zoo model; "
                         f"zoo models: {', '.join(sorted(zoo.MODELS))}.")


def load_base(base: str, *, attention_backend: str = "auto"):
    """(model, config, tokenizer-or-None) from a pretraining workdir of ours (its ``hf/`` export and
    ``tokenizer.json``), a Hugging Face directory (config.json + *.safetensors), or the name of a
    :mod:`tokensparse.zoo` model (e.g. ``"smollm2-135m"``) when no such path exists, so a real
    pretrained base needs no export step. A zoo model comes with its own tokenizer, which
    fine-tuning then uses for the corpus (its ids are the ones the weights were trained on)."""
    check_base(base)
    path = pathlib.Path(base)
    if not path.exists():  # an existing path always wins over a zoo name
        return zoo.load(base, attention_backend=attention_backend)
    if (path / "hf").is_dir():
        from tokenizers import Tokenizer

        model, model_config = hf.load_llama(path / "hf", attention_backend=attention_backend)
        return model, model_config, Tokenizer.from_file(str(path / "tokenizer.json"))
    model, model_config = hf.load_llama(path, attention_backend=attention_backend)
    return model, model_config, None


def finetune(c: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """LoRA fine-tuning of a base model (see :func:`load_base`) at ``config.train.seq_len`` on
    long-document windows, with RoPE linear scaling to the target length when it exceeds the base's
    context; evaluation is dense perplexity on validation windows.

    The summary's ``val_*`` keys are that dense evaluation (the LeMo spec's protocol, §2.9). With
    ``method="lemo"`` the same windows are also scored with the LeMo forward the model was trained
    with (``val_sparse_loss``, ``val_sparse_ppl``, ``val_sparse_tokens``): the train/eval gap."""
    workdir = pathlib.Path(workdir)
    tc = build_train_config(c.train)
    mesh = build_mesh(c)
    lora_config, lemo_config = build_finetune_method(c)
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

    layout = sequence_layout(tc, mesh, lemo_config.block_size if lemo_config else 1)

    def train_loss_fn(model, batch):
        if lemo_config is None:
            return train.lm_loss(model, batch, loss_segment=tc.loss_segment, layout=layout)
        return lemo_loss(model, batch, lemo=lemo_config, loss_segment=tc.loss_segment, layout=layout)

    if lemo_config is not None and lemo_config.schedule in ("algorithm1", "sensitivity"):
        lemo_config = _tune_lemo_profile(model, lemo_config, train_docs, tc, workdir)
    if lemo_config is not None:
        check_lemo(model, lemo_config, tc.seq_len)
    step_fn = train.make_train_step(train_loss_fn, wrt=lora.LoRAParam)
    evaluate = _eval_fn(eval_batches, loss_fn)
    with _on_mesh(mesh, model, optimizer, batches) as batches:
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
    """Algorithm 1, or the loss-budgeted sensitivity profile, on calibration windows of the train
    split (their own seed, batch 1); the profile is written to ``workdir/lemo_profile.json`` with
    what produced it, and reused when resuming."""
    path = workdir / "lemo_profile.json"
    if path.exists():
        profile = tuple(json.loads(path.read_text())["profile"])
    else:
        windows = data.WindowBatches(train_docs, batch_size=1, seq_len=tc.seq_len, seed=tc.seed + 1)
        calibration = [windows.batch(i) for i in range(lemo_config.calibration_windows)]
        if lemo_config.schedule == "algorithm1":
            from tokensparse.lemo.threshold import tune_thresholds

            tuned = tune_thresholds(model, calibration, lemo_config, rounds=lemo_config.tune_rounds)
            record = {"thresholds": tuned.thresholds, "profile": tuned.profile,
                      "history": tuned.history}
        else:
            from tokensparse.lemo.sensitivity import tune_profile

            record = dataclasses.asdict(tune_profile(model, calibration, lemo_config,
                                                     keep_ratio=lemo_config.keep_ratio,
                                                     budget=lemo_config.loss_budget))
        profile = tuple(record["profile"])
        _write_json(path, {"schedule": lemo_config.schedule, **record})
    return lemo_config.replace(schedule="profile", profile=profile)


def predictor_train_config(c: config_dict.ConfigDict) -> PredictorTrainConfig:
    values = c.to_dict()
    values["layers"] = tuple(values.get("layers") or ())
    return _dataclass_from(PredictorTrainConfig, values, "config.train")


def predictor_setup(c: config_dict.ConfigDict, tc: PredictorTrainConfig):
    """``(model, model_config, train_windows, held_out)`` of a predictor run: the frozen base at
    ``tc.seq_len`` (RoPE scaled), and the train / validation windows it trains and is scored on."""
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
    return model, model_config, train_windows, held_out


def predictor_sparse_layers(config: ModelConfig, tc: PredictorTrainConfig, scored) -> list[str]:
    """The default LeMo schedule's sparse layers among those in ``scored`` (keys are str(layer)):
    the layers the recall summaries average over."""
    return [str(i) for i in tc.default_sparse_layers(config.n_layers) if str(i) in scored]


def train_predictors(c: config_dict.ConfigDict, workdir: str | pathlib.Path) -> dict:
    """Train LeMo predictors for a frozen base at ``config.train.seq_len`` (RoPE linear scaling to
    it, as fine-tuning will use) on train-split windows; report held-out recall and Spearman.

    Writes ``workdir/predictors`` (load with ``--config.lemo.predictors`` in fine-tuning),
    ``metrics.jsonl``, ``summary.json``; resumes from ``workdir/checkpoints``."""
    workdir = pathlib.Path(workdir)
    tc = predictor_train_config(c.train)
    workdir.mkdir(parents=True, exist_ok=True)
    model, model_config, train_windows, held_out = predictor_setup(c, tc)
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
        cache = predictor_training.TargetCache(
            model, held_out, run.predictors.layer_ids, tc.block_size,
            directory=predictor_training.targets_directory(tc, workdir) / "held_out")
        metrics = predictor_training.evaluate(run.predictors, cache, range(tc.eval_windows),
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
    _write_json(workdir / "summary.json", summary)
    return summary


def set_context(model: Llama, config: ModelConfig) -> None:
    """Point every attention layer at ``config``'s RoPE scaling (weights are unaffected)."""
    model.config = config
    for block in model.layers:
        block.attn.rope_scaling = config.rope_scaling
