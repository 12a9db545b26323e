"""The byte-level BPE tokenizer: training it on a corpus's train split, caching it on disk, and
encoding documents into token ids.

Byte-level BPE (GPT-2 style pre-tokenizer and decoder, all 256 bytes in the initial alphabet, so any
text encodes and decodes back exactly) with special tokens ``<|endoftext|>`` (id 0, appended to every
document as EOS) and ``<|pad|>`` (id 1). :func:`get_tokenizer` trains on ``corpus.train`` and caches
the JSON in :func:`~tokensparse.data.corpus.cache_dir`, keyed by a hash of the train texts and the
vocabulary size. :func:`encode_documents` turns documents into int32 id arrays ending in EOS, the
input of :mod:`tokensparse.data.batching`.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from collections.abc import Iterable

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from tokensparse.data.corpus import Corpus, Document, cache_dir

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
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"the tokenizer has no {EOS!r} special token to end documents with.")
    return eos


def check_tokens(tokens, vocab_size: int) -> None:
    """ValueError unless every id is in ``[0, vocab_size)`` (an id past the embedding fails silently)."""
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return
    hi, lo = int(tokens.max()), int(tokens.min())
    if hi >= vocab_size or lo < 0:
        raise ValueError(f"token ids must be in [0, vocab_size={vocab_size}) but the max id is {hi} "
                         f"(min {lo}); use a model with vocab_size > {hi} or the matching tokenizer.")


_ENCODED: dict[str, list[np.ndarray]] = {}  # the last few encode_documents results, in this process


def encode_documents(tokenizer: tokenizers.Tokenizer, docs: Iterable[Document | str]) -> list[np.ndarray]:
    """int32 ids per document with ``<|endoftext|>`` appended (special-token text is matched as such).

    Encoding the Shakespeare corpus takes seconds, so the last few results are remembered in-process
    (keyed by the tokenizer's JSON and the texts) and returned as fresh copies.
    """
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    key = _digest([tokenizer.to_str(), *texts])
    if key not in _ENCODED:
        eos = eos_id(tokenizer)
        out = [np.asarray([*e.ids, eos], np.int32)
               for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
        for ids in out:
            check_tokens(ids, tokenizer.get_vocab_size())
        if len(_ENCODED) >= 4:
            _ENCODED.pop(next(iter(_ENCODED)))
        _ENCODED[key] = out
    return [ids.copy() for ids in _ENCODED[key]]
