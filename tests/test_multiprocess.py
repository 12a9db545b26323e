"""Several processes on one machine: ``jax.distributed`` with CPU collectives (gloo), a localhost
coordinator and 4 simulated devices per process, so 2 processes make the 8 devices of a
data=2 × fsdp=4 mesh spanning both.

A tiny pretraining run and a tiny LeMo fine-tune (``tests/multiprocess_driver.py``: the experiments'
config files and pipelines) must give the losses of the same runs in one process with 8 devices, and
checkpoints written by one process must resume in the pair (pretraining: the full state) and the
pair's in one process (the fine-tune: LoRA state), continuing to the uninterrupted run's losses.
Process 0 alone writes the run files (one ``metrics.jsonl`` record per step). A SIGTERM reaching
one process stops both at the same, saved step.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tests._env import subprocess_env
from tokensparse import sharding
from tokensparse.config import MeshConfig, preset
from tokensparse.llama import Llama

ROOT = pathlib.Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "multiprocess_driver.py"
DEVICES = 8
MESH = {"mesh.data": 2, "mesh.fsdp": 4, "progress": False}
PRETRAIN_STEPS, FINETUNE_STEPS = 4, 2
RTOL = 1e-5


def pretrain_task(workdir) -> dict:
    return {"kind": "pretrain", "workdir": str(workdir), "set": {
        **MESH, "train.steps": PRETRAIN_STEPS, "train.batch_size": 8, "train.log_every": 1,
        "train.checkpoint_every": PRETRAIN_STEPS // 2, "train.eval_batches": 1}}


def finetune_task(workdir, base) -> dict:
    return {"kind": "finetune", "workdir": str(workdir), "set": {
        **MESH, "base": str(base), "method": "lemo", "lemo.selector": "oracle",
        "train.steps": FINETUNE_STEPS, "train.batch_size": 8, "train.log_every": 1,
        "train.checkpoint_every": FINETUNE_STEPS // 2, "train.eval_batches": 1}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tasks: list[dict], processes: int) -> list[subprocess.Popen]:
    """Start ``tasks`` in ``processes`` processes sharing :data:`DEVICES` devices."""
    env = subprocess_env()
    env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={DEVICES // processes}"
    address = f"127.0.0.1:{_free_port()}"
    commands = [[sys.executable, str(DRIVER), json.dumps(tasks)]
                + ([address, str(processes), str(i)] if processes > 1 else [])
                for i in range(processes)]
    return [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for c in commands]


def run(tasks: list[dict], processes: int, timeout: float = 600, procs=None) -> list[dict]:
    """Run ``tasks`` in ``processes`` processes (or wait for ``procs`` running them); each
    process's ``RESULT`` records, in process order."""
    procs = procs or start(tasks, processes)
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"process {i} of {processes} exited {p.returncode}:\n{err[-4000:]}"
    results = []
    for out, _ in outputs:
        records = [json.loads(line.removeprefix("RESULT ")) for line in out.splitlines()
                   if line.startswith("RESULT ")]
        assert len(records) == len(tasks), out
        results.append(records)
    return results


def losses(workdir) -> dict[int, float]:
    """step -> loss of ``workdir/metrics.jsonl``, checking there is one record per step."""
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
               .splitlines()]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"not one record per step: {steps}"
    return {r["step"]: r["loss"] for r in records}


def assert_same_losses(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                               rtol=RTOL)


def stop_early(workdir, steps: int) -> None:
    """As if the run had been stopped after its checkpoint at ``steps // 2``: the final checkpoint
    is removed. The records up to there are marked: a resumed run keeps them (a fresh one would
    start a fresh log), which is how the test knows it resumed."""
    workdir = pathlib.Path(workdir)
    shutil.rmtree(workdir / "checkpoints" / str(steps))
    log = workdir / "metrics.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**r, "before_resume": r["step"] <= steps // 2}) + "\n"
                           for r in records))


def resumed(workdir, steps: int) -> bool:
    records = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
               .splitlines()]
    return [r["step"] for r in records if r.get("before_resume")] == list(range(1, steps // 2 + 1))


def test_to_local_gathers_whole_values_onto_one_device():
    """What precedes process 0's export: every variable whole on the process's first device, with
    the values the sharded model had (8 devices in this process: fsdp=4 splits the weights)."""
    model = Llama(preset("tiny"), rngs=nnx.Rngs(0))
    want = jax.tree.map(np.asarray, nnx.state(model))
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4))
    with jax.set_mesh(mesh):
        sharding.shard(model)
    sharded = [x for x in jax.tree.leaves(nnx.state(model)) if len(x.sharding.device_set) > 1
               and not x.sharding.is_fully_replicated]
    assert sharded, "the mesh split no weight: the test would check nothing"
    sharding.to_local(model, mesh=mesh)
    first = jax.local_devices()[0]
    for x in jax.tree.leaves(nnx.state(model)):
        assert x.sharding.device_set == {first}
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, nnx.state(model)), want)
    sharding.barrier("one process: a no-op")


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across(tmp_path):
    single_pre, single_fine = tmp_path / "single_pretrain", tmp_path / "single_finetune"
    pair_pre, pair_fine = tmp_path / "pair_pretrain", tmp_path / "pair_finetune"
    base = single_pre  # both fine-tunes start from the same exported weights

    # Uninterrupted: one process with 8 devices, then two with 4 each.
    (single,) = run([pretrain_task(single_pre), finetune_task(single_fine, base)], processes=1)
    pair = run([pretrain_task(pair_pre), finetune_task(pair_fine, base)], processes=2)
    assert single[0]["devices"] == DEVICES and single[0]["processes"] == 1
    for i, records in enumerate(pair):
        assert records[0]["process"] == i and records[0]["processes"] == 2
        assert records[0]["devices"] == DEVICES
        assert sorted(set(np.ravel(records[0]["mesh_processes"]))) == [0, 1]  # spans both
    want_pre, want_fine = losses(single_pre), losses(single_fine)
    assert len(want_pre) == PRETRAIN_STEPS and len(want_fine) == FINETUNE_STEPS
    assert_same_losses(losses(pair_pre), want_pre)
    assert_same_losses(losses(pair_fine), want_fine)
    for k in ("val_loss", "train_loss"):  # every process returns the global summary
        for records in pair:
            np.testing.assert_allclose(records[0]["summary"][k], single[0]["summary"][k], rtol=RTOL)
            np.testing.assert_allclose(records[1]["summary"][k], single[1]["summary"][k], rtol=RTOL)
    assert (pair_pre / "hf" / "model.safetensors").is_file()  # written by process 0
    assert not list(pair_pre.glob(".lock*")), "a process left its workdir lock"

    # Cross resume: stop a run one checkpoint early; the pair resumes the single process's
    # pretraining (full state) and one process the pair's fine-tune (LoRA state), each continuing
    # to the uninterrupted losses.
    runs = {single_pre: (PRETRAIN_STEPS, want_pre), pair_fine: (FINETUNE_STEPS, want_fine)}
    for workdir, (steps, _) in runs.items():
        stop_early(workdir, steps)
    run([pretrain_task(single_pre)], processes=2)
    run([finetune_task(pair_fine, base)], processes=1)
    for workdir, (steps, want) in runs.items():
        assert resumed(workdir, steps), f"{workdir.name} did not resume from step {steps // 2}"
        assert_same_losses(losses(workdir), want)
        assert (workdir / "checkpoints" / str(steps)).is_dir()


@pytest.mark.slow
def test_a_signal_to_one_process_stops_all_at_the_same_step(tmp_path):
    """A preemption signal reaching one process only: every process saves the same step and stops
    (deciding alone, the signalled one would start a checkpoint save while the others start the
    next step: both wait forever)."""
    workdir = tmp_path / "run"
    task = pretrain_task(workdir)
    task["set"].update({"train.steps": 10_000, "train.checkpoint_every": 10_000})
    procs = start([task], processes=2)
    log = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 500
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            "the pair did not start training"
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    results = run([task], processes=2, timeout=300, procs=procs)
    summaries = [records[0]["summary"] for records in results]
    assert all(s["interrupted"] for s in summaries), summaries
    assert summaries[0]["steps"] == summaries[1]["steps"] < 10_000
    assert summaries[1]["signal"] == "SIGTERM"
    assert (workdir / "checkpoints" / str(summaries[0]["steps"])).is_dir()
    assert not (workdir / "summary.json").exists()
