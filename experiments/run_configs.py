"""The experiments' command-line configs: how they lay out the pipelines' run configs.

The config files (``experiments/configs/*.py``) build their ConfigDicts with :func:`pretrain_dict`,
:func:`finetune_dict` and :func:`predictors_dict` from the library's dataclasses
(:mod:`experiments.config_dicts` generates each section); :func:`build` turns one back into the
pipeline's run config (``PretrainConfig``, ``FinetuneConfig``, ``PredictorsConfig``) and checks it
against the machine; :func:`describe` lists every field with its value and help (``--config_help``).

Three conveniences exist only in this command-line form:

- ``config.model`` is a ``{preset, overrides}`` section (a preset with any ModelConfig field
  replaced; ``overrides.vocab_size`` unset: the tokenizer's vocabulary) or ``"subllm"`` /
  ``"dense"`` (``config.subllm``'s SUBLLM or its dense twin);
- ``config.subllm`` is a preset with every SubLLMConfig field but the backbone (``overrides.*``
  changes that), ``level_keep`` (per-level keep ratios; empty: ``keep`` for every level) and the
  SubLLMTrainConfig fields;
- ``config.lemo.predictors`` (``FinetuneConfig.predictors``) with ``config.lemo.selector="auto"``:
  the predictors when a directory is given, the library's default rule (``LeMoConfig().selector``,
  the learned selector) otherwise; ``config.lemo.selector_weights``
  (``FinetuneConfig.selector_weights``) gives that rule its weights for a base the library ships
  none for.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import config_dict

from experiments import config_dicts
from experiments.config_dicts import apply_overrides, field_docs, from_dict, overrides_section, section
from tokensparse.config import (
    DataConfig,
    LeMoConfig,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    preset,
    preset_names,
)
from tokensparse.pipelines import finetune, predictors, pretrain
from tokensparse.pipelines.finetune import FinetuneConfig
from tokensparse.pipelines.predictors import PredictorsConfig
from tokensparse.pipelines.pretrain import PretrainConfig, SubLLMTrainConfig
from tokensparse.subllm.structure import SubLLMConfig, dense_twin, subllm_preset, subllm_preset_names

# Help of fields whose dataclass does not document them yet (tokensparse/lemo/ is being reworked in
# parallel): move each into an attribute docstring under the field, then delete it here.


RUN_TOP = ("attention_backend", "progress")


def model_dict(preset_name: str, **overrides: Any) -> config_dict.ConfigDict:
    """``config.model`` for a plain Llama: a preset with any ModelConfig field overridden."""
    return config_dict.ConfigDict({"preset": preset_name,
                                   "overrides": overrides_section(ModelConfig, **overrides)})


def subllm_dict(preset_name: str = "subllm-small", *, training: SubLLMTrainConfig | None = None,
                overrides: dict | None = None, **changes: Any) -> config_dict.ConfigDict:
    """``config.subllm``: the preset, every SubLLMConfig field but ``model`` (``keep`` one ratio,
    ``level_keep`` one per level or empty), the SubLLMTrainConfig fields, and ``overrides`` of the
    backbone's ModelConfig fields."""
    config = subllm_preset(preset_name, **changes)
    c = section(config, exclude=("model", "keep"))
    per_level = not isinstance(config.keep, int | float)
    c.keep = float(config.keep[0] if per_level else config.keep)
    c.level_keep = tuple(config.keep) if per_level else ()
    for name, value in section(training or SubLLMTrainConfig()).items():
        c[name] = value
    c.preset = preset_name
    c.overrides = overrides_section(ModelConfig, **(overrides or {}))
    return c


def pretrain_dict(*, model: config_dict.ConfigDict | str, train: TrainConfig,
                  data: DataConfig | None = None, subllm: config_dict.ConfigDict | None = None,
                  mesh: MeshConfig | None = None, **top: Any) -> config_dict.ConfigDict:
    """A pretraining config file's dict: ``model`` from :func:`model_dict`, or ``"subllm"`` /
    ``"dense"`` with ``subllm`` from :func:`subllm_dict`; ``top`` sets PretrainConfig's
    attention_backend and progress."""
    c = config_dict.ConfigDict()
    c.model = model
    if subllm is not None:
        c.subllm = subllm
    c.data, c.train = section(data or DataConfig()), section(train)
    c.mesh = section(mesh or MeshConfig(data=1))
    defaults = {f.name: f.default for f in dataclasses.fields(PretrainConfig) if f.name in RUN_TOP}
    for name in RUN_TOP:
        c[name] = top.pop(name, defaults[name])
    if top:
        raise ValueError(f"pretrain_dict: unknown keys {sorted(top)}.")
    return c


LEMO_PATHS = ("predictors", "selector_weights")  # FinetuneConfig fields shown under config.lemo
ALIASES = {"finetune": {name: f"lemo.{name}" for name in LEMO_PATHS}}  # field: its config path


def finetune_dict(run: FinetuneConfig) -> config_dict.ConfigDict:
    """A fine-tuning config file's dict: ``run``'s fields, with ``predictors`` and
    ``selector_weights`` under ``lemo`` and ``lemo.selector`` ``"auto"`` unless ``run`` chose one."""
    c = section(run, exclude=LEMO_PATHS)
    for name in LEMO_PATHS:
        c.lemo[name] = getattr(run, name)
    if run.lemo.selector == LeMoConfig().selector and not run.predictors:
        c.lemo.selector = "auto"
    return c


def predictors_dict(run: PredictorsConfig) -> config_dict.ConfigDict:
    """A predictor-training config file's dict: ``run``'s fields."""
    return section(run)


KINDS = ("subllm", "dense")


def _llama_model(model: dict) -> tuple[ModelConfig, bool]:
    unknown = sorted(set(model) - {"preset", "overrides"})
    if unknown:
        raise ValueError(f"config.model has unknown keys {unknown}; it holds preset and overrides.")
    name = model.get("preset")
    if name not in preset_names():
        raise ValueError(f"config.model.preset={name!r} is not a preset; available: {preset_names()}.")
    overrides = model.get("overrides") or {}
    config = apply_overrides(preset(name), overrides, "config.model.overrides")
    return config, overrides.get("vocab_size") is None


def _subllm_model(s: dict, kind: str) -> tuple[SubLLMConfig, SubLLMTrainConfig, bool]:
    s = dict(s)
    name = s.pop("preset", None)
    if name not in subllm_preset_names():
        raise ValueError(f"config.subllm.preset={name!r} is not a SUBLLM preset; available: "
                         f"{subllm_preset_names()}.")
    overrides = s.pop("overrides", None) or {}
    level_keep = s.pop("level_keep", ())
    train_names = {f.name for f in dataclasses.fields(SubLLMTrainConfig)}
    training = from_dict(SubLLMTrainConfig, {k: s.pop(k) for k in list(s) if k in train_names},
                         "config.subllm")
    base = subllm_preset(name)
    s["model"] = apply_overrides(base.model, overrides, "config.subllm.overrides")
    if level_keep:
        s["keep"] = tuple(level_keep)
    config = from_dict(SubLLMConfig, s, "config.subllm", base=base)
    return (dense_twin(config) if kind == "dense" else config), training, overrides.get("vocab_size") is None


def model_config(c) -> ModelConfig:
    """The ModelConfig of a ``config.model`` section (:func:`model_dict`)."""
    return _llama_model(_as_dict(c))[0]


def subllm_config(c, kind: str = "subllm") -> SubLLMConfig:
    """The SubLLMConfig of a ``config.subllm`` section (:func:`subllm_dict`), or its dense twin."""
    return _subllm_model(_as_dict(c), kind)[0]


def pretrain_config(c) -> PretrainConfig:
    """The :class:`PretrainConfig` of a pretraining ConfigDict (see :func:`pretrain_dict`)."""
    values = _as_dict(c)
    model, subllm = values.pop("model", None), values.pop("subllm", None)
    if isinstance(model, dict):
        values["model"], values["vocab_from_tokenizer"] = _llama_model(model)
    elif model not in KINDS:
        raise ValueError(f"config.model={model!r} must be one of {KINDS} (SUBLLM or its dense twin), "
                         "or a {preset, overrides} section for a plain Llama.")
    elif subllm is None:
        raise ValueError(f"config.model={model!r} needs config.subllm (a SUBLLM config file, e.g. "
                         "experiments/configs/pretrain_subllm_small.py).")
    else:
        values["model"], values["subllm"], values["vocab_from_tokenizer"] = _subllm_model(subllm, model)
    return from_dict(PretrainConfig, values, "config")


def finetune_config(c) -> FinetuneConfig:
    """The :class:`FinetuneConfig` of a fine-tuning ConfigDict (see :func:`finetune_dict`)."""
    values = _as_dict(c)
    lemo = dict(values.get("lemo") or {})
    for name in LEMO_PATHS:
        values[name] = lemo.pop(name, "")
    if lemo.get("selector") == "auto":
        lemo["selector"] = "predictor" if values["predictors"] else LeMoConfig().selector
    values["lemo"] = lemo
    return from_dict(FinetuneConfig, values, "config", aliases=ALIASES["finetune"])


def predictors_config(c) -> PredictorsConfig:
    """The :class:`PredictorsConfig` of a predictor-training ConfigDict."""
    return from_dict(PredictorsConfig, _as_dict(c), "config")


def _as_dict(c) -> dict:
    return c.to_dict() if isinstance(c, config_dict.ConfigDict) else dict(c)


BUILDERS = {"pretrain": pretrain_config, "finetune": finetune_config,
            "train_predictors": predictors_config}
CHECKS = {"pretrain": (pretrain.check, PretrainConfig), "finetune": (finetune.check, FinetuneConfig),
          "train_predictors": (predictors.check, PredictorsConfig)}
PIPELINES = {"pretrain": pretrain.pretrain, "finetune": finetune.finetune,
             "train_predictors": predictors.train_predictors}


def build(kind: str, c):
    """The pipeline config of a ``kind`` run's ConfigDict, validated; then what the machine can
    check without data (mesh, base path). Errors are ``ValueError`` naming the config path."""
    run = BUILDERS[kind](c)
    check_fn, cls = CHECKS[kind]
    try:
        check_fn(run)
    except ValueError as e:
        message = str(e)
        if message.startswith(f"{cls.__name__}."):
            message = config_dicts.with_aliases("config." + message.removeprefix(f"{cls.__name__}."),
                                                "config", ALIASES.get(kind))
        raise ValueError(message) from None
    return run


# ----------------------------------------------------------------------------- help


_EXTRA_HELP = {
    "model": "A {preset, overrides} section for a plain Llama, or subllm / dense: config.subllm's "
             "SUBLLM or its dense twin (the same backbone and recipe).",
    "model.preset": f"Model preset ({', '.join(preset_names())}); overrides replace its fields.",
    "subllm.preset": f"SUBLLM preset ({', '.join(subllm_preset_names())}); the other fields and "
                     "overrides replace its own.",
    "subllm.keep": "Keep ratio in (0, 1] of every nesting level (level_keep: one per level).",
    "subllm.level_keep": "One keep ratio per nesting level, outermost first, e.g. [0.64, 0.5]; "
                         "empty: keep for every level.",
    "lemo.selector": f"How blocks are chosen: a rule of tokensparse.lemo.rules (learned, oracle, "
                     f"random, attention_ratio, ...; see LeMoConfig.selector), or auto: predictor when "
                     f"config.lemo.predictors is set, else {LeMoConfig().selector!r} (the library's "
                     f"default).",
    "lemo.predictors": f"{field_docs(FinetuneConfig)['predictors']} Setting it selects them "
                       "(selector=auto).",
    "lemo.selector_weights": field_docs(FinetuneConfig)["selector_weights"],
}
_OVERRIDE_NOTE = "Unset: the preset's. "
_SCHEMAS = {
    "pretrain": (PretrainConfig, {"model.overrides": (ModelConfig,), "subllm.overrides": (ModelConfig,),
                                  "subllm": (SubLLMConfig, SubLLMTrainConfig)}),
    "finetune": (FinetuneConfig, {}),
    "train_predictors": (PredictorsConfig, {}),
}


def _walk(classes: tuple, parts: list[str]) -> str:
    for i, part in enumerate(parts):
        owner = next((cls for cls in classes if part in config_dicts.field_types(cls)), None)
        if owner is None:
            return ""
        if i == len(parts) - 1:
            return field_docs(owner).get(part, "")
        classes = config_dicts.dataclass_types(config_dicts.field_types(owner)[part])
    return ""


def field_help(kind: str, path: str) -> str:
    """The help of config path ``path`` (``train.steps``) of a ``kind`` run."""
    if path in _EXTRA_HELP:
        return _EXTRA_HELP[path]
    root, redirects = _SCHEMAS[kind]
    parts = path.split(".")
    for n in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in redirects:
            note = _OVERRIDE_NOTE if prefix.endswith("overrides") else ""
            found = _walk(redirects[prefix], parts[n:])
            return note + found if found else ""
    return _walk((root,), parts)


def describe(kind: str, c) -> str:
    """Every field of a ``kind`` run's ConfigDict with its value and help (``--config_help``)."""
    return config_dicts.describe(c, lambda path: field_help(kind, path))


def define_config_flags(sections: config_dict.ConfigDict, kind: str, what: str) -> config_dicts.ConfigFlags:
    """A benchmark's ``--config`` (``sections``: part of a ``kind`` run's config) and ``--config_help``."""
    return config_dicts.define_config_flags(sections, lambda path: field_help(kind, path), what)
