"""A run's workdir as a model: :func:`load_run` rebuilds what a pretraining or fine-tuning run trained.

A workdir holds ``config.json`` (the run's settings and the model config it built), ``tokenizer.json``
and ``checkpoints/`` (Orbax steps of the trained parameters, the optimizer state and the RNG). A
pretraining run's checkpoints hold every weight; a fine-tuning run's hold only its LoRA adapters, so
its base is loaded again from where ``config.json`` says it came from. Only the parameters are read
(no optimizer state), from the newest checkpoint that reads, so an interrupted run loads too.

:func:`set_context` (RoPE scaling for a longer context) and :func:`load_base` (a base model with its
tokenizer) are the pipelines' own functions, exported here as the public names.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tokensparse import data, lora
from tokensparse.checkpoint import Checkpointer
from tokensparse.config import LoRAConfig, ModelConfig
from tokensparse.llama import Llama
from tokensparse.pipelines import fingerprint
from tokensparse.pipelines.base import load_base, set_context
from tokensparse.validation import json_object

__all__ = ["RunInfo", "load_run", "load_base", "read_run", "set_context"]


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What :func:`read_run` found in a workdir's ``config.json``."""

    kind: str
    """``"pretrain"`` or ``"finetune"``."""
    experiment: dict
    """The run's settings, as recorded."""
    model: ModelConfig
    """The model config the run trained (a fine-tune's: the base's, at the run's context)."""
    base: str | None = None
    """A fine-tune's base (a path or zoo name); None for pretraining."""
    lora: LoRAConfig | None = None
    """A fine-tune's adapters; None for pretraining."""


def _json(file: pathlib.Path) -> dict:
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: load_run expects the --workdir of a pretrain or "
                                "finetune run (config.json, tokenizer.json, checkpoints/).")
    return json_object(file)


def _recorded_base(workdir: pathlib.Path, experiment: dict) -> str:
    """The fine-tune's base: the resolved path the run fingerprinted (valid from any directory),
    else ``experiment["base"]`` as given (also when the fingerprint is missing or unreadable)."""
    try:
        record = fingerprint.read(workdir)
    except ValueError:
        record = None
    resolved = record["fingerprint"].get("base") if record else None
    if resolved and (pathlib.Path(resolved).exists() or not pathlib.Path(experiment["base"]).exists()):
        return resolved
    return experiment["base"]


def read_run(workdir: str | os.PathLike) -> RunInfo:
    """The kind, settings and model config of the run in ``workdir`` (reads only ``config.json``)."""
    workdir = pathlib.Path(workdir)
    file = workdir / "config.json"
    record = _json(file)
    experiment = record.get("experiment")
    if not isinstance(experiment, dict):
        raise ValueError(f"{file} has no 'experiment' section: not a tokensparse run's config.json.")
    if "subllm" in record:
        raise ValueError(f"{file} describes a SUBLLM run: load_run rebuilds plain Llama runs "
                         "(pretraining or fine-tuning) only.")
    if not isinstance(record.get("model"), dict):
        raise ValueError(f"{file} has no 'model' section (a train_predictors run?): load_run "
                         "rebuilds pretraining and fine-tuning runs.")
    model = ModelConfig.from_dict(record["model"])
    if "base" in experiment and "lora" in experiment:
        lora_dict = dict(experiment["lora"])
        lora_dict["targets"] = tuple(lora_dict.get("targets", LoRAConfig().targets))
        return RunInfo(kind="finetune", experiment=experiment, model=model,
                       base=_recorded_base(workdir, experiment), lora=LoRAConfig(**lora_dict))
    return RunInfo(kind="pretrain", experiment=experiment, model=model, base=None, lora=None)


def load_run(workdir: str | os.PathLike, *, step: int | None = None,
             attention_backend: str = "auto"):
    """``(model, config, tokenizer)`` of the run in ``workdir``, finished or interrupted, for
    evaluation or generation (the model is in eval mode: no LoRA dropout).

    - pretraining: a Llama of ``config.json``'s model config holding the checkpoint's weights;
    - fine-tuning: the base ``config.json`` names (loaded with :func:`load_base`), set to the run's
      context (:func:`set_context`), with the run's LoRA adapters (still separate: merge them with
      :func:`tokensparse.lora.merge_lora`, or export with :mod:`tokensparse.export`).

    ``step``: that checkpoint step; default the newest one that reads (a damaged newest step is
    skipped with a warning). ``config`` is the trained ModelConfig (with the run's RoPE scaling);
    ``tokenizer`` is the workdir's ``tokenizer.json``. Single-host: the weights land on the default
    device."""
    workdir = pathlib.Path(workdir)
    info = read_run(workdir)
    tokenizer = data.load_tokenizer(workdir / "tokenizer.json")
    if not (workdir / "checkpoints").is_dir():
        raise FileNotFoundError(f"{workdir / 'checkpoints'} not found: the run saved no checkpoint "
                                "yet.")
    with Checkpointer(workdir / "checkpoints", save_every=1, read_only=True) as checkpointer:
        saved, _ = checkpointer.restore_items(("params",), step)
    config = info.model
    if info.kind == "finetune":
        # The run's own tokenizer.json stands in for data.tokenizer (which may be a relative path):
        # a base without a tokenizer then loads, and one with its own is checked against it.
        model, _, _ = load_base(info.base, tokenizer=str(workdir / "tokenizer.json"),
                                attention_backend=attention_backend)
        set_context(model, config)
        lora.add_lora(model, info.lora, rngs=nnx.Rngs(0))
        wrt = lora.LoRAParam
    else:
        model = Llama(config, attention_backend=attention_backend, rngs=nnx.Rngs(0))
        wrt = nnx.Param
    _fill(model, saved["params"], wrt, f"{workdir / 'checkpoints'}")
    model.eval()
    return model, config, tokenizer


def _flat_saved(tree, prefix=()) -> dict[tuple[str, ...], np.ndarray]:
    """Orbax's nested dict of a saved ``nnx.State`` → ``{path: array}`` (paths as strings, without
    the variables' trailing ``"value"``)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return {prefix: tree["value"]}
        out = {}
        for key, sub in tree.items():
            out.update(_flat_saved(sub, (*prefix, str(key))))
        return out
    return {prefix: tree}


def _saved_sizes(flat: dict) -> tuple[int, ...] | None:
    """The layer-group sizes the checkpoint was saved with (each group's leading axis)."""
    sizes: dict[int, int] = {}
    for path, array in flat.items():
        if path[:2] == ("layers", "groups") and len(path) > 2:
            sizes.setdefault(int(path[2]), int(np.shape(array)[0]))
    return tuple(sizes[g] for g in sorted(sizes)) if sizes else None


def _fill(model: Llama, saved: dict, wrt, where: str) -> None:
    """Put the checkpoint's ``wrt`` parameters into ``model``: grouped as saved (LeMo runs regroup
    their layers), then stored back as one group."""
    flat = _flat_saved(saved)
    sizes = _saved_sizes(flat)
    if sizes is not None and sum(sizes) == len(model.layers):
        model.layers.regroup(sizes)
    current = {tuple(str(k) for k in path): (path, var)
               for path, var in nnx.to_flat_state(nnx.state(model, wrt))}
    problems = [f"{'/'.join(p)}: not in the checkpoint" for p in current if p not in flat]
    problems += [f"{'/'.join(p)}: in the checkpoint, not in the model" for p in flat
                 if p not in current]
    problems += [f"{'/'.join(p)}: checkpoint {np.shape(flat[p])}, model {current[p][1].shape}"
                 for p in current if p in flat and np.shape(flat[p]) != current[p][1].shape]
    if problems:
        shown = problems[:10] + ([f"... {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ValueError(f"the checkpoint in {where} does not fit the model rebuilt from "
                         "config.json:\n  " + "\n  ".join(shown))
    nnx.update(model, nnx.from_flat_state(
        [(path, var.replace(jnp.asarray(flat[key], var.dtype))) for key, (path, var)
         in current.items()]))
    model.layers.regroup((len(model.layers),))
