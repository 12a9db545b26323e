"""What every pipeline shares: the mesh, data preparation, evaluation, summaries and run files.

A run's life in its workdir (every pipeline): :func:`run_directory` makes the workdir and holds its
lock; :func:`check_resume` checks, before anything in the workdir is written, that a resumed run
has the same model and the fingerprint it was started with
(:mod:`~tokensparse.pipelines.fingerprint`); :func:`record_run` then stores the fingerprint with
the other run files. A run stopped by SIGTERM / Ctrl-C saves a checkpoint and returns
:func:`interrupted_summary`: no final evaluation, no ``summary.json``, no export (those describe
finished runs only).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
from typing import Any

import jax
import numpy as np

from tokensparse import data, sharding, train
from tokensparse.config import DataConfig, MeshConfig, ModelConfig, TrainConfig
from tokensparse.loop import LoopResult, check_resumable
from tokensparse.metrics import compiled_memory
from tokensparse.pipelines import fingerprint
from tokensparse.pipelines import workdir as run_workdir


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_attention_backend(owner: str, name: str) -> None:
    """Raise unless ``name`` is ``"auto"`` or a registered attention backend."""
    from tokensparse import attention

    names = ("auto", *attention.backends())
    check(name in names, f"{owner}.attention_backend={name!r} must be one of {names}.")


def to_json(config) -> dict[str, Any]:
    """A (nested) config dataclass as JSON-compatible data: what runs record next to checkpoints."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def write_json(path: pathlib.Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, by process 0 only (several processes share the workdir), written
    whole and then renamed into place: a reader (another process, a later run) never sees a part."""
    if jax.process_index() != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def make_mesh(mesh_config: MeshConfig, owner: str):
    """The run's mesh (None for a single device); raises naming ``owner.mesh`` when the devices
    cannot hold it."""
    try:
        shape = mesh_config.shape(jax.device_count())
    except ValueError as e:
        raise ValueError(f"{owner}.mesh: {e}") from None
    if math.prod(shape) == 1:
        return None
    return sharding.make_mesh(mesh_config)


@contextlib.contextmanager
def on_mesh(mesh, model, optimizer, batches):
    """Inside: the mesh is set, model and optimizer state are placed per the sharding rules, and the
    yielded batch source feeds global arrays. Without a mesh, all of that is left as is."""
    if mesh is None:
        yield batches
        return
    with jax.set_mesh(mesh):
        sharding.shard(model, optimizer, mesh=mesh)
        yield sharding.ShardedBatches(batches, mesh)


def sequence_layout(tc: TrainConfig, mesh, multiple: int = 1):
    """The training loss's ``layout`` for ``tc.seq_layout`` on ``mesh`` (None: keep array order)."""
    if tc.seq_layout != "zigzag" or mesh is None or mesh.shape["seq"] == 1:
        return None
    shards = mesh.shape["seq"]
    sharding.zigzag_order(tc.seq_len, shards, multiple)  # fail now, before compiling, if it can't
    return functools.partial(sharding.zigzag_order, shards=shards, multiple=multiple)


def prepare_data(data_config: DataConfig):
    """The corpus and the BPE tokenizer trained on it, or ``data_config.tokenizer``'s when set
    (nothing is written to the workdir: the run saves the tokenizer with :func:`save_tokenizer` once
    its resume check has passed)."""
    corpus = data.load_corpus(data_config.source)
    if data_config.tokenizer:
        return corpus, data.load_tokenizer(data_config.tokenizer)
    return corpus, data.get_tokenizer(corpus, data_config.vocab_size)


def save_tokenizer(tokenizer, workdir: pathlib.Path) -> None:
    """``workdir/tokenizer.json`` and its special-token files, so the run's BOS/EOS travel with it
    (process 0; :func:`tokensparse.data.save_hf_tokenizer`)."""
    if jax.process_index() != 0:
        return
    data.save_hf_tokenizer(tokenizer, workdir)


@contextlib.contextmanager
def run_directory(workdir: str | pathlib.Path):
    """The workdir (made when missing; ValueError when it is a file), locked for the ``with`` block:
    a second process on it gets :class:`~tokensparse.pipelines.workdir.WorkdirBusy`."""
    path = run_workdir.prepare(workdir)
    with run_workdir.lock(path):
        yield path


@dataclasses.dataclass(frozen=True)
class ResumeCheck:
    """What :func:`check_resume` found: the step resumed from (None: fresh), the run's fingerprint
    and the fields changed with ``allow_changed_resume``."""

    step: int | None
    fingerprint: dict
    changed: list


def check_resume(workdir: pathlib.Path, experiment: dict, built: dict, *, allow: bool | None,
                 tokenizer=None, corpus=None) -> ResumeCheck:
    """Before anything in ``workdir`` is written: a resumed run must have the same model
    (``built["model"]``; CheckpointError otherwise: no option overrides that) and the fingerprint
    it was started with (unless ``allow``; one-line ValueError listing the changed fields).
    ``experiment``: the run config as JSON data; ``built``: what was built from it (model config,
    SUBLLM structure)."""
    fp = fingerprint.of_run(experiment, built, tokenizer=tokenizer, corpus=corpus)
    step = check_resumable(workdir, built)
    changed = fingerprint.check(workdir, fp, resuming=step is not None, allow=allow)
    return ResumeCheck(step, fp, changed)


def record_run(workdir: pathlib.Path, resume: ResumeCheck) -> None:
    """Store the run's fingerprint (after :func:`check_resume` passed)."""
    fingerprint.write(workdir, resume.fingerprint, resumed_step=resume.step, diff=resume.changed)


def interrupted_summary(steps: int, signal_name: str | None) -> dict:
    """What a run stopped by a signal returns (its checkpoint is saved; nothing final is written):
    the command line exits 128 + the signal's number."""
    return {"steps": steps, "interrupted": True, "signal": signal_name or "SIGINT"}


def check_vocab(tokenizer, model_config: ModelConfig) -> None:
    if tokenizer.get_vocab_size() > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the model's vocab_size is "
            f"{model_config.vocab_size}; set the model's vocab_size >= {tokenizer.get_vocab_size()} "
            f"(--config.model.overrides.vocab_size) or data.vocab_size <= {model_config.vocab_size} "
            "(--config.data.vocab_size).")


def unigram_entropy(docs) -> float:
    """Entropy (nats/token) of the corpus' unigram distribution: the loss of the best model that
    ignores context, a yardstick for "the model learned something"."""
    counts = np.bincount(np.concatenate(list(docs)))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def eval_fn(eval_batches, loss_fn):
    eval_step = train.make_eval_step(loss_fn)
    return lambda model: train.evaluate(eval_step, model, eval_batches)


def evaluate_all(eval_batches, losses: dict):
    """One evaluation function over several loss functions; keys prefixed per loss."""
    fns = {prefix: eval_fn(eval_batches, fn) for prefix, fn in losses.items()}
    return lambda model: {f"{prefix}{k}": v for prefix, fn in fns.items() for k, v in fn(model).items()}


def run_summary(model, optimizer, step_fn, batch, result: LoopResult, final_eval: dict) -> dict:
    """The summary every run reports: steps, last training loss and throughput, compiled memory of
    the step, and the final evaluation (``val_*``)."""
    cost = compiled_memory(step_fn, model, optimizer, batch)
    last = result.history[-1] if result.history else {}
    return {"steps": result.step, "interrupted": result.interrupted,
            "train_loss": last.get("loss"),
            "tokens_per_s": next((r["tokens_per_s"] for r in reversed(result.history)
                                  if "tokens_per_s" in r), None),  # steady steps, no compile
            "activation_bytes": cost.temp_bytes, "argument_bytes": cost.argument_bytes,
            **{f"val_{k}": v for k, v in final_eval.items()}}
