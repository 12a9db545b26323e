"""Getting a trained model out: a merged Hugging Face Llama directory, or a PEFT LoRA adapter.

- :func:`save_merged`: the adapters folded into the base weights (``W + (alpha/r) a b``, see
  :mod:`tokensparse.lora`) and written by :func:`tokensparse.hf.save_llama`: ``config.json`` (with
  the run's RoPE scaling), ``generation_config.json``, safetensors (sharded with
  ``model.safetensors.index.json`` past a size) and the tokenizer files. Loads with
  :func:`tokensparse.hf.load_llama` or ``transformers.AutoModelForCausalLM.from_pretrained``.
- :func:`save_peft`: ``adapter_config.json`` + ``adapter_model.safetensors`` as the ``peft`` library
  writes them for a Llama LoRA (``PeftModel.save_pretrained``), so ``PeftModel.from_pretrained(base,
  DIR)`` loads them. Written against peft 0.20.1.dev0 (commit 5d602fd) — :data:`PEFT_VERSION`;
  the key names and config fields used here are the same since peft 0.14.
- :func:`export_run`: either one for a run's workdir (:func:`tokensparse.runs.load_run`).

The q/k projections need no row permutation: Hugging Face Llama stores q/k in the rotate-half RoPE
layout that :mod:`tokensparse.rope` uses (see :mod:`tokensparse.hf`), so an adapter's output
columns are already in Hugging Face's order.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from tokensparse import hf, lora
from tokensparse.layer_stack import per_layer_flat

FORMATS = ("merged", "peft")
PEFT_VERSION = "0.20.1.dev0"
"""The peft release whose ``save_pretrained`` output :func:`save_peft` reproduces."""
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# Zoo models' Hugging Face ids (their weights there are full precision; the zoo's are Q4_1 GGUF).
ZOO_HF_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def save_merged(model, config, out: str | os.PathLike, *, tokenizer=None,
                max_shard_bytes: int | None = None, in_place: bool = False) -> pathlib.Path:
    """Write ``model`` with its LoRA adapters merged as a Hugging Face Llama directory ``out``.

    ``config``: the model's ModelConfig (e.g. from :func:`tokensparse.runs.load_run`); its RoPE
    scaling goes into ``config.json``. The merge happens on a copy of the model unless
    ``in_place`` (then ``model`` loses its adapters; no second copy of the weights is made)."""
    if lora.has_lora(model):
        model = lora.merge_lora(model if in_place else nnx.clone(model))
    options = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    hf.save_llama(model, config, out, tokenizer=tokenizer, **options)
    return pathlib.Path(out)


def _adapter_modules(model):
    """``{(part, proj): LoRA module of the first layer group}`` for every adapted projection."""
    group = model.layers.groups[0]
    found = {}
    for part, proj in hf.PROJECTIONS:
        adapter = getattr(getattr(group, part), proj).adapter
        if isinstance(adapter, lora.LoRA):
            found[(part, proj)] = adapter
    return found


def peft_state_dict(model) -> dict[str, np.ndarray]:
    """The adapters under peft's key names, ``base_model.model.model.layers.{i}.self_attn.q_proj.
    lora_A.weight`` (``[r, in]``, our ``a`` transposed) and ``....lora_B.weight`` (``[out, r]``,
    ``b`` transposed), float32."""
    flat = per_layer_flat(dict(nnx.to_flat_state(lora.lora_state(model))), model.layers.sizes)
    tensors = {}
    for path, var in flat.items():
        _, i, part, proj, _, which = path  # ("layers", i, "attn", "q_proj", "adapter", "a")
        name = "lora_A" if which == "a" else "lora_B"
        key = f"base_model.model.model.layers.{i}.{hf.PROJECTIONS[(part, proj)]}.{name}.weight"
        tensors[key] = np.ascontiguousarray(np.asarray(var[...], np.float32).T)
    return tensors


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def peft_config(model, *, base_model_name_or_path: str | None = None) -> dict:
    """``adapter_config.json`` for ``model``'s adapters: rank, ``lora_alpha = scale * r`` (peft
    scales by ``lora_alpha / r``, as we do), dropout and target modules read from the adapters
    themselves; the other fields are the values that describe a plain LoRA (no bias, no DoRA, no
    rsLoRA, ``fan_in_fan_out`` false: the weights are ``nn.Linear``'s ``[out, in]``)."""
    adapters = _adapter_modules(model)
    if not adapters:
        raise ValueError("The model has no LoRA adapters to export (add_lora, or load a fine-tuning "
                         "run with tokensparse.runs.load_run).")
    first = next(iter(adapters.values()))
    rank = int(first.a.shape[-1])
    dropout = first.dropout.rate if first.dropout is not None else 0.0
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": _number(first.scale * rank),
        "lora_bias": False,
        "lora_dropout": float(dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(proj for _, proj in adapters),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }


def save_peft(model, out: str | os.PathLike, *, base_model_name_or_path: str | None = None,
              tokenizer=None) -> pathlib.Path:
    """Write ``model``'s adapters as a peft LoRA adapter directory ``out`` (``adapter_config.json``,
    ``adapter_model.safetensors``; the tokenizer's files too when given, as a convenience).

    ``base_model_name_or_path`` goes into the config: what ``AutoPeftModelForCausalLM`` loads
    the adapter onto. The adapter applies to the base's weights as they are: a run trained at a
    longer context with RoPE scaling needs that scaling in the base's config too (the merged
    export carries it)."""
    config = peft_config(model, base_model_name_or_path=base_model_name_or_path)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(peft_state_dict(model), out / PEFT_WEIGHTS, metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        from tokensparse.data.tokenizer import save_hf_tokenizer

        save_hf_tokenizer(tokenizer, out)
    return out


def peft_base_name(base: str) -> str:
    """What a fine-tune's ``base`` is called in ``adapter_config.json``: a Hugging Face directory
    as its absolute path, a pretraining workdir as its ``hf/`` export, a zoo model as its Hugging
    Face id (:data:`ZOO_HF_IDS`)."""
    path = pathlib.Path(base)
    if path.exists():
        return str((path / "hf" if (path / "hf").is_dir() else path).resolve())
    return ZOO_HF_IDS.get(base, base)


def export_run(workdir: str | os.PathLike, out: str | os.PathLike, *, format: str = "merged",
               step: int | None = None, max_shard_bytes: int | None = None) -> pathlib.Path:
    """Export the run in ``workdir`` (finished or interrupted: its newest readable checkpoint, or
    ``step``) to ``out`` as ``format``: ``"merged"`` (any pretraining or fine-tuning run) or
    ``"peft"`` (fine-tuning runs: the adapter alone)."""
    from tokensparse import runs

    if format not in FORMATS:
        raise ValueError(f"format={format!r} must be one of {FORMATS}.")
    info = runs.read_run(workdir)
    if format == "peft" and info.kind != "finetune":
        raise ValueError(f"format='peft' exports a fine-tuning run's adapters; {workdir} is a "
                         "pretraining run (use format='merged').")
    model, config, tokenizer = runs.load_run(workdir, step=step)
    if format == "merged":
        return save_merged(model, config, out, tokenizer=tokenizer,
                           max_shard_bytes=max_shard_bytes, in_place=True)
    if config.rope_scaling.kind == "linear":
        warnings.warn(f"{workdir} trained with linear RoPE scaling (factor "
                      f"{config.rope_scaling.factor:g}); load the base with rope_scaling="
                      f"{{'rope_type': 'linear', 'factor': {config.rope_scaling.factor:g}}} to use "
                      "the adapter at that context (the merged export carries it).", stacklevel=2)
    return save_peft(model, out, base_model_name_or_path=peft_base_name(info.base),
                     tokenizer=tokenizer)
