"""Tokenizers: the byte-level BPE trained on a corpus's train split (cached on disk), a pretrained
model's own tokenizer read from (and written to) a Hugging Face directory, and encoding documents
into token ids.

Byte-level BPE (GPT-2 style pre-tokenizer and decoder, all 256 bytes in the initial alphabet, so any
text encodes and decodes back exactly) with special tokens ``<|endoftext|>`` (id 0, appended to every
document as EOS) and ``<|pad|>`` (id 1). :func:`get_tokenizer` trains on ``corpus.train`` and caches
the JSON in :func:`~tokensparse.data.corpus.cache_dir`, keyed by a hash of the train texts and the
vocabulary size. :func:`encode_documents` turns documents into int32 id arrays ending in EOS, the
input of :mod:`tokensparse.data.batching`.

A pretrained model travels with its tokenizer: :func:`load_tokenizer` reads a ``tokenizer.json`` (or
an HF directory's, with the BOS/EOS ids of ``tokenizer_config.json``, ``special_tokens_map.json``,
``generation_config.json`` or ``config.json``) into a plain ``tokenizers.Tokenizer`` carrying
``bos_token_id`` / ``eos_token_id`` attributes, the type every loader returns;
:func:`save_hf_tokenizer` writes the files ``transformers``' ``AutoTokenizer`` reads back.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tokensparse.data.corpus import Corpus, Document, cache_dir
from tokensparse.validation import check_token_ids, json_object

EOS = "<|endoftext|>"
PAD = "<|pad|>"
_TOKENIZER_RECIPE = "bytelevel-bpe-v1"  # bump when train_tokenizer changes, to invalidate caches


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> tokenizers.Tokenizer:
    """Byte-level BPE over ``texts``; ids 0 and 1 are ``<|endoftext|>`` and ``<|pad|>``."""
    minimum = 256 + 2
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small: byte-level BPE needs >= {minimum} "
                         "(256 bytes + 2 special tokens).")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _digest(texts: Iterable[str]) -> str:
    """A hash of a sequence of strings (length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for text in texts:
        raw = text.encode("utf-8", "surrogatepass")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()[:20]


def tokenizer_path(corpus: Corpus, vocab_size: int = 8192) -> pathlib.Path:
    """The cache file :func:`get_tokenizer` reads or writes for ``(corpus.train, vocab_size)``."""
    key = _digest([_TOKENIZER_RECIPE, str(vocab_size), *(d.text for d in corpus.train)])
    return cache_dir() / "tokenizers" / f"bpe{vocab_size}-{key}.json"


def get_tokenizer(corpus: Corpus, vocab_size: int = 8192) -> tokenizers.Tokenizer:
    """The BPE tokenizer of ``corpus.train``: loaded from the cache, or trained (seconds) and cached."""
    if not corpus.train:
        raise ValueError("corpus.train is empty: the tokenizer is trained on the train split.")
    path = tokenizer_path(corpus, vocab_size)
    if path.is_file():
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception:  # an unreadable cache entry is rebuilt
            path.unlink(missing_ok=True)
    tok = train_tokenizer((d.text for d in corpus.train), vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: concurrent processes never read a partial file
    return tok


def eos_id(tokenizer: tokenizers.Tokenizer) -> int:
    """The id that ends documents: the tokenizer's ``eos_token_id`` (a pretrained model's, set by
    the loaders) or else its ``<|endoftext|>`` token."""
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = tokenizer.token_to_id(EOS) if eos is None else eos
    if eos is None:
        raise ValueError(f"the tokenizer has no EOS token to end documents with: neither an "
                         f"eos_token (tokenizer_config.json) nor {EOS!r}.")
    return int(eos)


def id_limit(tokenizer: tokenizers.Tokenizer) -> int:
    """One past the largest id the tokenizer can produce (added tokens included): the embedding
    rows it needs."""
    return 1 + max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)


def check_fits(tokenizer: tokenizers.Tokenizer, vocab_size: int, what: str) -> None:
    """ValueError unless every id of ``tokenizer`` has a row in a ``vocab_size`` embedding.

    A smaller tokenizer is accepted: checkpoints often pad the embedding past the tokenizer (to a
    multiple of 64 or 128 for fast matmuls, e.g. Qwen2's 151,646 tokens in 151,936 rows), and the
    unused rows are never indexed. A larger one would index past the table, which XLA clamps
    silently, so it is refused. ``what`` names the tokenizer's source in the message."""
    need = id_limit(tokenizer)
    if need > vocab_size:
        raise ValueError(f"{what} has ids up to {need - 1} but the model's embedding has "
                         f"vocab_size={vocab_size} rows: it is not this model's tokenizer.")


def _json_file(path: pathlib.Path) -> dict:
    """A JSON object from ``path`` ({} when absent); a ValueError naming the file when unreadable."""
    return json_object(path) if path.is_file() else {}


def _token_text(value) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _special_id(tokenizer: tokenizers.Tokenizer, directory: pathlib.Path, kind: str) -> int | None:
    """``kind`` ("bos" or "eos")'s id: the token named by tokenizer_config.json or
    special_tokens_map.json, else the id in generation_config.json or config.json (the first of a
    list), else None."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        text = _token_text(_json_file(directory / name).get(f"{kind}_token"))
        if text is not None:
            token = tokenizer.token_to_id(text)
            if token is None:
                raise ValueError(f"{directory / name} names {kind}_token={text!r}, which is not in "
                                 f"{directory / 'tokenizer.json'}.")
            return token
    for name in ("generation_config.json", "config.json"):
        value = _json_file(directory / name).get(f"{kind}_token_id")
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """A ``tokenizer.json`` file, or a directory holding one (a Hugging Face model directory), as a
    ``tokenizers.Tokenizer`` with ``bos_token_id`` / ``eos_token_id`` set (None where unknown) from
    the special-token files beside it. One-line ValueErrors name an unreadable file."""
    path = pathlib.Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: expected a tokenizer.json (the "
                                "`tokenizers` library's format) or a directory holding one.")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{file} is not a readable tokenizer.json: "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    tok.bos_token_id = _special_id(tok, file.parent, "bos")
    tok.eos_token_id = _special_id(tok, file.parent, "eos")
    return tok


def hf_tokenizer(directory: str | os.PathLike) -> tokenizers.Tokenizer | None:
    """The tokenizer of a Hugging Face model directory (:func:`load_tokenizer`), or None when it
    has no ``tokenizer.json`` (e.g. only a sentencepiece ``tokenizer.model``, not supported)."""
    directory = pathlib.Path(directory)
    return load_tokenizer(directory) if (directory / "tokenizer.json").is_file() else None


def special_ids(tokenizer: tokenizers.Tokenizer) -> tuple[int | None, int | None]:
    """(bos, eos) ids of a tokenizer (None where it has none)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.token_to_id(EOS)
    return getattr(tokenizer, "bos_token_id", None), eos


def save_hf_tokenizer(tokenizer: tokenizers.Tokenizer, directory: str | os.PathLike) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` into
    ``directory`` (each whole, then renamed into place): what ``transformers.AutoTokenizer`` (as
    ``PreTrainedTokenizerFast``) and :func:`load_tokenizer` read, BOS/EOS included."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tokenizer.json.{os.getpid()}.tmp"
    try:
        tokenizer.save(str(tmp))
    except Exception as e:  # the Rust side raises a bare Exception (a full disk, a read-only directory)
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {directory / 'tokenizer.json'}: {e}") from e
    os.replace(tmp, directory / "tokenizer.json")  # each file whole, then renamed into place
    specials = {}
    for kind, token in zip(("bos", "eos"), special_ids(tokenizer), strict=True):
        if token is not None:
            specials[f"{kind}_token"] = tokenizer.id_to_token(token)
    if PAD in tokenizer.get_vocab(with_added_tokens=True):
        specials["pad_token"] = PAD
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              **specials}
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
        tmp = directory / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, directory / name)


def check_tokens(tokens, vocab_size: int) -> None:
    """ValueError unless every id is in ``[0, vocab_size)``
    (:func:`tokensparse.validation.check_token_ids`)."""
    check_token_ids(tokens, vocab_size)


_ENCODED: dict[str, list[np.ndarray]] = {}  # the last few encode_documents results, in this process


def encode_documents(tokenizer: tokenizers.Tokenizer, docs: Iterable[Document | str]) -> list[np.ndarray]:
    """int32 ids per document with ``<|endoftext|>`` appended (special-token text is matched as such).

    Encoding the Shakespeare corpus takes seconds, so the last few results are remembered in-process
    (keyed by the tokenizer's JSON and the texts) and returned as fresh copies.
    """
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    eos = eos_id(tokenizer)
    key = _digest([tokenizer.to_str(), str(eos), *texts])
    if key not in _ENCODED:
        out = [np.asarray([*e.ids, eos], np.int32)
               for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        for ids in out:
            check_tokens(ids, id_limit(tokenizer))
        if len(_ENCODED) >= 4:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = out
    return [ids.copy() for ids in _ENCODED[key]]
