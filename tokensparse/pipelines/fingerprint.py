"""A run's fingerprint: the settings that decide its training trajectory, checked on resume.

Resuming a workdir with another learning rate, seed, batch size, tokenizer or corpus silently
continues a different run on top of the old one's state. Each pipeline therefore stores, in
``workdir/fingerprint.json``, a flat ``{"train.lr": 3e-4, ...}`` map of everything that shapes the
trajectory: the run config (optimisation, schedule, batch, context, seed, LoRA / LeMo / SUBLLM
options, data source, base), the model config as built, and digests of the tokenizer and of the
corpus' text. A resume whose fingerprint differs is refused with a one-line diff of the changed
fields, before anything in the workdir is written; ``train.allow_changed_resume`` lets a deliberate
change through (recorded in the file's ``changes``).

Not in the fingerprint: the step count (a run may be extended), logging, evaluation and checkpoint
cadence, tracking, and the knobs that change memory or speed but not the mathematics (remat,
loss_segment, grad_accum_steps, attention_backend, mesh, progress). Note that a cosine schedule
decays over ``train.steps``, so extending a cosine run changes its learning rate from the resumed
step on.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import warnings
from typing import Any

import jax

FILE = "fingerprint.json"
UNTRACKED = frozenset({
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.keep_checkpoints", "train.allow_changed_resume",
    "train.remat", "train.remat_names", "train.loss_segment", "train.eval_windows",
    "train.targets_dir", "train.grad_accum_steps", "train.tensorboard", "train.wandb_project",
    "attention_backend", "progress"})
UNTRACKED_PREFIXES = ("mesh.",)
_SHOWN = 8  # changed fields listed in one message
_WIDTH = 40  # characters of one shown value


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _tracked(name: str) -> bool:
    return name not in UNTRACKED and not name.startswith(UNTRACKED_PREFIXES)


def digest(*texts: str) -> str:
    """A short sha256 over ``texts`` (each length-prefixed, so boundaries count)."""
    h = hashlib.sha256()
    for text in texts:
        raw = text.encode()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()[:16]


def corpus_digest(corpus) -> str:
    """Of every document's split, name and text: adding, removing or editing a file changes it."""
    return digest(*(part for split in ("train", "validation", "test")
                    for doc in getattr(corpus, split) for part in (split, doc.name, doc.text)))


def tokenizer_digest(tokenizer) -> str:
    return digest(tokenizer.to_str())


def of_run(experiment: dict, built: dict, *, tokenizer=None, corpus=None) -> dict[str, Any]:
    """The fingerprint of a run: ``experiment`` (the run config as JSON data), ``built`` (what the
    pipeline built from it: the model config as built under ``"model"``, which replaces the
    config's own entry, and anything else under ``"built."``) and the tokenizer / corpus digests,
    flat and JSON-normalised."""
    tree = {k: v for k, v in experiment.items() if not (k == "model" and "model" in built)}
    tree.update({k if k == "model" else f"built.{k}": v for k, v in built.items()})
    flat = {k: v for k, v in flatten(tree).items() if _tracked(k)}
    if tokenizer is not None:
        flat["tokenizer.sha256"] = tokenizer_digest(tokenizer)
    if corpus is not None:
        flat["corpus.sha256"] = corpus_digest(corpus)
    return json.loads(json.dumps(flat, default=str))  # as stored: tuples become lists


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= _WIDTH else text[:_WIDTH - 3] + "..."


def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["train.lr: 0.0003 -> 0.01", ...]`` for every field that differs, sorted by name. A field
    the old run recorded that the new fingerprint lacks (a setting that no longer exists or no
    longer applies: a LoRA run's LeMo options) is not a change; a field new to the fingerprint is,
    since the old run ran without it (e.g. a new option whose default changes the mathematics)."""
    missing = object()
    out = []
    for name in sorted(new):
        a, b = old.get(name, missing), new.get(name, missing)
        if a != b:
            out.append(f"{name}: {'(unset)' if a is missing else _show(a)} -> "
                       f"{'(unset)' if b is missing else _show(b)}")
    return out


def summary(diff: list[str]) -> str:
    shown = "; ".join(diff[:_SHOWN])
    return shown + (f"; and {len(diff) - _SHOWN} more" if len(diff) > _SHOWN else "")


def read(workdir: pathlib.Path) -> dict | None:
    """The stored record (None: no fingerprint yet); ValueError naming the file when unreadable."""
    path = pathlib.Path(workdir) / FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("fingerprint"), dict):
            raise ValueError("no 'fingerprint' object")
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); restore it, or delete it to resume without "
                         "the settings check.") from None
    return record


def check(workdir: pathlib.Path, fingerprint: dict, *, resuming: bool,
          allow: bool | None) -> list[str]:
    """Raise ``ValueError`` (one line: the changed fields) when ``workdir`` holds a checkpoint
    (``resuming``) written with another fingerprint, unless ``allow`` (None: the run has no such
    option; the message then offers deleting the fingerprint). Returns the changes (empty when
    none, or when nothing is resumed). Writes nothing."""
    record = read(workdir)
    if not resuming or record is None:
        return []
    diff = changes(record["fingerprint"], fingerprint)
    if diff and not allow:
        escape = ("pass --config.train.allow_changed_resume=True" if allow is not None
                  else f"delete {pathlib.Path(workdir) / FILE}")
        raise ValueError(f"workdir {workdir} holds a run with other settings ({summary(diff)}); "
                         f"rerun with the original settings, use a fresh --workdir, or {escape} to "
                         "continue it with these.")
    if diff:
        warnings.warn(f"resuming {workdir} with changed settings (allow_changed_resume): "
                      f"{summary(diff)}.", RuntimeWarning, stacklevel=2)
    return diff


def write(workdir: pathlib.Path, fingerprint: dict, *, resumed_step: int | None,
          diff: list[str]) -> None:
    """Store ``fingerprint``: a fresh run's, or after an allowed change (appended to
    ``changes`` with the step it applies from). Process 0 only; atomic."""
    if jax.process_index() != 0:
        return
    record = (read(workdir) if resumed_step is not None else None) or {}
    history = list(record.get("changes", []))
    if diff:
        history.append({"from_step": resumed_step, "changed": diff})
    path = pathlib.Path(workdir) / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "changes": history}, indent=2))
    tmp.replace(path)
