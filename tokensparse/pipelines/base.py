"""Pretrained bases for fine-tuning and predictor training: where they come from, and their context."""

from __future__ import annotations

import pathlib

from tokensparse import data, hf, zoo
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


def load_base(base: str, *, tokenizer: str = "", attention_backend: str = "auto", mesh=None):
    """``(model, config, tokenizer)`` of a pretrained base: a pretraining workdir of ours (its
    ``hf/`` export), a Hugging Face directory (config.json + *.safetensors), or the name of a
    :mod:`tokensparse.zoo` model (e.g. ``"smollm2-135m"``) when no such path exists, so a real
    pretrained base needs no export step.

    The tokenizer travels with the base: the directory's ``tokenizer.json`` (with its special-token
    files) or the zoo model's, so the corpus is encoded with the ids the weights were trained on.
    ``tokenizer`` (``DataConfig.tokenizer``: a tokenizer.json, or a directory holding one) supplies
    it for a base that has none; for a base that has one it must have the same vocabulary. A base
    with neither, or a tokenizer with ids past the model's embedding, is a one-line ValueError.
    With ``mesh``, a Hugging Face base's weights are read straight into the training layout
    (:func:`tokensparse.hf.load_llama`)."""
    check_base(base)
    path = pathlib.Path(base)
    if not path.exists():  # an existing path always wins over a zoo name
        model, config, own = zoo.load(base, attention_backend=attention_backend)
        where = f"zoo model {base!r}"
    elif (path / "hf").is_dir():  # a pretraining workdir (older ones keep the tokenizer beside hf/)
        model, config, own = hf.load_llama(path / "hf", attention_backend=attention_backend,
                                           mesh=mesh)
        if own is None and (path / "tokenizer.json").is_file():
            own = data.load_tokenizer(path / "tokenizer.json")
        where = str(path / "tokenizer.json")
    else:
        model, config, own = hf.load_llama(path, attention_backend=attention_backend, mesh=mesh)
        where = str(path / "tokenizer.json")
    return model, config, _tokenizer_for(base, own, where, tokenizer, config.vocab_size)


def _tokenizer_for(base: str, own, where: str, explicit: str, vocab_size: int):
    """The base's tokenizer (``own``, from ``where``), or the ``explicit`` one (data.tokenizer)."""
    if not explicit:
        if own is None:
            raise ValueError(f"config.base={base!r} has no tokenizer ({where} does not exist): pass "
                             "--config.data.tokenizer=PATH, the tokenizer.json its weights were "
                             "trained with.")
        return own
    chosen = data.load_tokenizer(explicit)
    if own is not None and chosen.get_vocab(True) != own.get_vocab(True):
        raise ValueError(f"data.tokenizer={explicit!r} is not the tokenizer of config.base={base!r} "
                         f"({where}): their vocabularies differ; leave data.tokenizer empty to use "
                         "the base's own.")
    data.tokenizer.check_fits(chosen, vocab_size, f"data.tokenizer={explicit!r}")
    return chosen


def set_context(model: Llama, config: ModelConfig) -> None:
    """Point every attention layer at ``config``'s RoPE scaling (weights are unaffected)."""
    model.config = config
    for group in model.layers.groups:  # the stacked layers themselves, not per-layer copies
        group.attn.rope_scaling = config.rope_scaling
