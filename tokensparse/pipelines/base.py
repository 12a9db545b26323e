"""Pretrained bases for fine-tuning and predictor training: where they come from, and their context."""

from __future__ import annotations

import pathlib

from tokensparse import hf, zoo
from tokensparse.config import ModelConfig
from tokensparse.llama import Llama


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


def set_context(model: Llama, config: ModelConfig) -> None:
    """Point every attention layer at ``config``'s RoPE scaling (weights are unaffected)."""
    model.config = config
    for group in model.layers.groups:  # the stacked layers themselves, not per-layer copies
        group.attn.rope_scaling = config.rope_scaling
