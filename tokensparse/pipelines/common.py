"""What every pipeline shares: the mesh, data preparation, evaluation, summaries and run files."""

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
from tokensparse.loop import LoopResult
from tokensparse.metrics import compiled_memory


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
    if jax.process_index() != 0:  # one writer when several processes share the workdir
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


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


def prepare_data(data_config: DataConfig, workdir: pathlib.Path):
    """The corpus and the BPE tokenizer trained on it (saved as ``workdir/tokenizer.json``)."""
    corpus = data.load_corpus(data_config.source)
    tokenizer = data.get_tokenizer(corpus, data_config.vocab_size)
    tokenizer.save(str(workdir / "tokenizer.json"))
    return corpus, tokenizer


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
            "train_loss": last.get("loss"), "tokens_per_s": last.get("tokens_per_s"),
            "activation_bytes": cost.temp_bytes, "argument_bytes": cost.argument_bytes,
            **{f"val_{k}": v for k, v in final_eval.items()}}
