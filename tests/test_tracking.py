"""Training records: learning rate, periodic validation loss, tokens/s without compile time, metrics
fetched from the device only when a record or checkpoint is written, TensorBoard event files that
read back, only process 0 writing, and optional W&B (a stand-in module: no network)."""

import json
import math
import struct
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tokensparse import loop, tracking
from tokensparse.config import TrainConfig

TC = TrainConfig(steps=20, lr=1e-2, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1,
                 log_every=5, eval_every=10, checkpoint_every=100)


class Batch:
    def __init__(self, step):
        self.tokens = np.full((2, 8), step, np.int32)


class Batches:
    def batch(self, step):
        return Batch(step)


def _step(model, optimizer, batch):
    """A stand-in train step: the loss is a known function of the step, returned as device arrays."""
    s = jnp.float32(batch.tokens[0, 0])
    return {"loss": 10.0 - s / 4, "grad_norm": s, "tokens": jnp.float32(batch.tokens.size)}


def _run(workdir, tc=TC, **kwargs):
    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
    return loop.train_loop(workdir=workdir, model=model, optimizer=optimizer, train_step=_step,
                           batches=Batches(), tc=tc, metadata={"model": {}}, progress=False,
                           eval_fn=lambda m: {"loss": 1.5, "ppl": math.exp(1.5)}, **kwargs)


def _expected_lr(i, tc=TC):
    """The schedule of the update of optimizer step i (0-based), from its definition: linear warm-up
    from 0, then cosine from lr down to min_lr_ratio * lr over the remaining steps."""
    if i < tc.warmup_steps:
        return tc.lr * i / tc.warmup_steps
    frac = (i - tc.warmup_steps) / (tc.steps - tc.warmup_steps)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_records_have_lr_val_loss_tokens_per_s_and_compile_time(tmp_path):
    result = _run(tmp_path)
    records = _records(tmp_path)
    assert records == result.history
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    for r in records:
        assert r["loss"] == pytest.approx(10.0 - (r["step"] - 1) / 4)  # that step's own loss
        assert r["lr"] == pytest.approx(_expected_lr(r["step"] - 1), rel=1e-5)
        assert r["tokens_per_s"] > 0
    assert [r.get("val_loss") for r in records] == [None, 1.5, None, 1.5]
    # The first step (compilation) is timed on its own, in the first record only.
    assert records[0]["compile_s"] > 0 and all("compile_s" not in r for r in records[1:])


def test_a_window_of_only_the_compile_step_has_no_tokens_per_s(tmp_path):
    _run(tmp_path, TC.replace(steps=3, log_every=1))
    records = _records(tmp_path)
    assert "tokens_per_s" not in records[0] and "compile_s" in records[0]
    assert all(r["tokens_per_s"] > 0 for r in records[1:])


def test_eval_steps_are_recorded_between_log_steps(tmp_path):
    _run(tmp_path, TC.replace(steps=12, log_every=4, eval_every=6))
    assert [(r["step"], "val_loss" in r) for r in _records(tmp_path)] == [
        (4, False), (6, True), (8, False), (12, True)]


def test_metrics_are_fetched_once_per_record_not_per_step(tmp_path, monkeypatch):
    fetched = []

    class CountingJax:
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def device_get(tree):
            fetched.append(len(tree))
            return jax.device_get(tree)

    monkeypatch.setattr(loop, "jax", CountingJax())
    _run(tmp_path)
    assert fetched == [5, 5, 5, 5]  # every step's loss checked, in one transfer per record


@pytest.mark.parametrize("processes", [1, 2])
def test_several_processes_ask_about_signals_only_at_synced_steps(tmp_path, monkeypatch, processes):
    """Whether a signal reached any process is a collective: with several processes it is asked at
    the records, evaluations and checkpoints only (no sync of the steps between); one process asks
    at every step (nothing to sync)."""
    from tokensparse import sharding

    asked = []

    class Processes:
        def __getattr__(self, name):
            return getattr(jax, name)

        @staticmethod
        def process_count():
            return processes

    steps = []  # the step each batch is for: the question after it is about step + 1
    monkeypatch.setattr(Batches, "batch", lambda self, step: steps.append(step) or Batch(step))
    monkeypatch.setattr(loop, "jax", Processes())
    monkeypatch.setattr(sharding, "any_process", lambda flag: asked.append(steps[-1] + 1) or bool(flag))
    _run(tmp_path, TC.replace(steps=12, log_every=4, eval_every=6, checkpoint_every=5))
    assert asked == ([4, 5, 6, 8, 10, 12] if processes > 1 else list(range(1, 13)))
    assert [r["step"] for r in _records(tmp_path)] == [4, 6, 8, 12]


def test_a_nan_between_records_stops_before_the_checkpoint(tmp_path):
    def step(model, optimizer, batch):
        s = batch.tokens[0, 0]
        return {"loss": jnp.float32(jnp.nan if s == 6 else 1.0), "grad_norm": jnp.float32(0.0)}

    model = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.0), wrt=nnx.Param)
    with pytest.raises(loop.TrainingDiverged, match=r"at step 6; .*last good checkpoint is step 5"):
        loop.train_loop(workdir=tmp_path, model=model, optimizer=optimizer, train_step=step,
                        batches=Batches(), tc=TC.replace(log_every=10, checkpoint_every=5),
                        metadata={"model": {}}, progress=False)


def _masked_crc(data: bytes) -> int:
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path):
    """The Event protos of one TFRecord event file, each record's framing and CRCs checked."""
    from tensorboardX.proto.event_pb2 import Event

    raw, events, at = path.read_bytes(), [], 0
    while at < len(raw):
        header = raw[at:at + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[at + 8:at + 12])[0] == _masked_crc(header)
        data = raw[at + 12:at + 12 + length]
        assert struct.unpack("<I", raw[at + 12 + length:at + 16 + length])[0] == _masked_crc(data)
        events.append(Event.FromString(data))
        at += 16 + length
    return events


def _scalars(logdir):
    out = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for event in read_events(path):
            for value in event.summary.value:
                out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboardX")
    _run(tmp_path)
    logdir = tmp_path / tracking.TENSORBOARD_DIR
    assert list(logdir.glob("events.out.tfevents.*"))
    scalars = _scalars(logdir)
    for r in _records(tmp_path):
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            assert scalars[key][r["step"]] == pytest.approx(r[key], rel=1e-6)
    assert scalars["val_loss"] == {10: 1.5, 20: 1.5}


def test_tensorboard_resume_purges_the_replayed_steps(tmp_path):
    pytest.importorskip("tensorboardX")
    tc = TC.replace(steps=10, checkpoint_every=5, eval_every=0)
    _run(tmp_path, tc)
    (tmp_path / "checkpoints" / "10").rename(tmp_path / "checkpoints" / "gone")  # resume at 5
    _run(tmp_path, tc)
    files = sorted((tmp_path / tracking.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 2
    resumed = read_events(files[-1])
    start = [e for e in resumed if e.HasField("session_log")]
    assert start and start[0].step == 5  # TensorBoard drops the first file's steps >= 5
    assert [r["step"] for r in _records(tmp_path)] == [5, 10]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with tracking.Tracker(tmp_path, wandb_project="p") as tracker:  # wandb not even imported
        tracker.log({"step": 1, "loss": 2.0})
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / tracking.TENSORBOARD_DIR).exists()


def _fake_wandb(calls):
    class Run:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    return types.SimpleNamespace(init=init, util=types.SimpleNamespace(generate_id=lambda: "abc123"))


def test_wandb_logs_scalars_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    for _ in range(2):
        with tracking.Tracker(tmp_path, tensorboard=False, wandb_project="proj",
                              config={"train": {"lr": 1.0}}) as tracker:
            tracker.log({"step": 3, "loss": 2.0, "note": "text", "val_loss": float("nan")})
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [(i["project"], i["id"], i["resume"]) for i in inits] == [("proj", "abc123", "allow")] * 2
    assert inits[0]["config"] == {"train": {"lr": 1.0}}
    assert ("log", 3, {"loss": 2.0}) in calls and calls.count(("finish",)) == 2


def test_wandb_project_without_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"^TrainConfig.wandb_project='proj' needs wandb"):
        tracking.Tracker(tmp_path, tensorboard=False, wandb_project="proj")


def test_tracking_fields_are_validated_and_untracked_by_the_fingerprint():
    from tokensparse.pipelines import fingerprint

    assert TrainConfig().eval_every > 0  # validation curves by default
    for name in ("train.grad_accum_steps", "train.tensorboard", "train.wandb_project"):
        assert name in fingerprint.UNTRACKED
