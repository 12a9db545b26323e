"""Runs that cannot be corrupted: the workdir lock, resume fingerprints, checkpoint fallback,
honest exit codes, one record per step in metrics.jsonl, and one-line user errors.

The pieces are tested in-process first (fast); the slow tests drive the real command lines the way
a user (or a scheduler) does: a second process, SIGTERM, kill -9, a changed flag, a damaged
checkpoint."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from _env import subprocess_env

from experiments import _checks
from tokensparse.checkpoint import Checkpointer, CheckpointError
from tokensparse.config import TrainConfig, preset
from tokensparse.loop import truncate_log
from tokensparse.pipelines import fingerprint
from tokensparse.pipelines import workdir as run_workdir
from tokensparse.pipelines.pretrain import PretrainConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the lock
def _holder_process(workdir: pathlib.Path) -> subprocess.Popen:
    """Another process that takes the lock and then sleeps (prints "locked" once it holds it)."""
    code = ("import sys, time; from tokensparse.pipelines import workdir as w\n"
            f"with w.lock({str(workdir)!r}, process_index=0):\n"
            "    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    proc = _holder_process(tmp_path)
    try:
        with pytest.raises(run_workdir.WorkdirBusy) as e, run_workdir.lock(tmp_path, process_index=0):
            pass
        message = str(e.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message
        assert str(tmp_path) in message and "\n" not in message
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holders_lock_is_taken_over_with_a_warning(tmp_path):
    proc = _holder_process(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up: the file still names it
    proc.wait()
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid
    with (pytest.warns(RuntimeWarning, match=f"stale lock .*pid {proc.pid} on host"),
          run_workdir.lock(tmp_path, process_index=0)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert not (tmp_path / ".lock").exists()


def test_the_lock_is_exclusive_within_a_process_and_released_on_errors(tmp_path):
    with pytest.raises(KeyError), run_workdir.lock(tmp_path, process_index=0):
        with (pytest.raises(run_workdir.WorkdirBusy, match=f"pid {os.getpid()}"),
              run_workdir.lock(tmp_path, process_index=0)):
            pass
        with run_workdir.lock(tmp_path, process_index=1):  # another process of the same run
            pass
        raise KeyError("boom")
    assert not (tmp_path / ".lock").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # released cleanly: nothing stale to take over
        with run_workdir.lock(tmp_path, process_index=0):
            pass


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    monkeypatch.setattr(run_workdir, "_try_flock", lambda fd: None)  # e.g. a network file system
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    lock = tmp_path / ".lock"
    lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    with (pytest.warns(RuntimeWarning, match=f"stale lock .*pid {dead}"),
          run_workdir.lock(tmp_path, process_index=0)):
        pass
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))  # alive
    with (pytest.raises(run_workdir.WorkdirBusy, match=f"pid {os.getppid()}"),
          run_workdir.lock(tmp_path, process_index=0)):
        pass
    lock.write_text(json.dumps({"pid": int(dead), "host": "elsewhere"}))  # cannot tell: respected
    with (pytest.raises(run_workdir.WorkdirBusy, match="on host elsewhere"),
          run_workdir.lock(tmp_path, process_index=0)):
        pass


def test_a_workdir_that_is_a_file_is_a_value_error(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"workdir .*/f exists and is not a directory"):
        run_workdir.prepare(tmp_path / "f")
    assert run_workdir.prepare(tmp_path / "new" / "run").is_dir()


# ----------------------------------------------------------------------------- fingerprints
def _fingerprint(tc: TrainConfig, **experiment):
    return fingerprint.of_run({"train": json.loads(json.dumps(tc.__dict__)), **experiment},
                              {"model": {"n_layers": 2}})


def test_fingerprint_tracks_the_trajectory_not_the_cadence():
    base = _fingerprint(TrainConfig())
    same = _fingerprint(TrainConfig(steps=999, log_every=3, checkpoint_every=7, eval_every=5,
                                    keep_checkpoints=9, remat="full", loss_segment=64,
                                    allow_changed_resume=True), progress=False)
    assert fingerprint.changes(base, same) == []
    other = _fingerprint(TrainConfig(lr=1e-2, seed=7, batch_size=2, b2=0.99))
    assert fingerprint.changes(base, other) == [
        "train.b2: 0.95 -> 0.99", "train.batch_size: 8 -> 2", "train.lr: 0.0003 -> 0.01",
        "train.seed: 0 -> 7"]
    assert "model.n_layers" in base and "mesh.data" not in _fingerprint(TrainConfig(), mesh={"data": 2})
    # A field the old run recorded but the new one lacks is no change; a field new to it is one.
    assert fingerprint.changes({**base, "lemo.block_size": 64}, base) == []
    assert fingerprint.changes(base, {**base, "lemo.eliminated": "sink_local"}) == [
        'lemo.eliminated: (unset) -> "sink_local"']


def test_fingerprint_digests_tokenizer_and_corpus():
    from tokensparse.data.corpus import Corpus, Document

    docs = (Document("a", "one"), Document("b", "two"))
    corpus = Corpus(train=docs, validation=(), test=())
    more = Corpus(train=(*docs, Document("c", "three")), validation=(), test=())
    moved = Corpus(train=docs[:1], validation=docs[1:], test=())
    digests = {fingerprint.corpus_digest(c) for c in (corpus, more, moved)}
    assert len(digests) == 3
    assert fingerprint.corpus_digest(corpus) == fingerprint.corpus_digest(
        Corpus(train=tuple(docs), validation=(), test=()))


def test_resume_check_refuses_in_one_line_allows_on_request_and_records(tmp_path):
    old, new = _fingerprint(TrainConfig()), _fingerprint(TrainConfig(lr=1e-2))
    assert fingerprint.check(tmp_path, new, resuming=True, allow=False) == []  # nothing stored
    fingerprint.write(tmp_path, old, resumed_step=None, diff=[])
    assert fingerprint.check(tmp_path, new, resuming=False, allow=False) == []  # a fresh start
    stored = (tmp_path / fingerprint.FILE).read_text()
    with pytest.raises(ValueError) as e:
        fingerprint.check(tmp_path, new, resuming=True, allow=False)
    assert "train.lr: 0.0003 -> 0.01" in str(e.value) and "\n" not in str(e.value)
    assert "--config.train.allow_changed_resume=True" in str(e.value)
    with pytest.raises(ValueError, match="delete .*fingerprint.json"):
        fingerprint.check(tmp_path, new, resuming=True, allow=None)
    assert (tmp_path / fingerprint.FILE).read_text() == stored  # the check writes nothing
    with pytest.warns(RuntimeWarning, match="changed settings"):
        diff = fingerprint.check(tmp_path, new, resuming=True, allow=True)
    fingerprint.write(tmp_path, new, resumed_step=4, diff=diff)
    record = json.loads((tmp_path / fingerprint.FILE).read_text())
    assert record["fingerprint"] == new
    assert record["changes"] == [{"from_step": 4, "changed": ["train.lr: 0.0003 -> 0.01"]}]
    (tmp_path / fingerprint.FILE).write_text("{garbage")
    with pytest.raises(ValueError, match=r"fingerprint.json is unreadable"):
        fingerprint.check(tmp_path, new, resuming=True, allow=False)


# ----------------------------------------------------------------------------- checkpoints
def _steps(tmp_path, n=3) -> Checkpointer:
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5)
    for step in range(1, n + 1):
        ckpt.save(step, {"w": jnp.full((4,), float(step))}, {"step": step})
    return ckpt


def _damage(step_dir: pathlib.Path, how: str) -> None:
    if how == "truncate_data":
        files = [f for f in step_dir.glob("state/**/d/*") if f.is_file()]
        assert files
        for f in files:
            os.truncate(f, f.stat().st_size // 2)
    elif how == "delete_metadata":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "delete_manifest":
        (step_dir / "state" / "manifest.ocdbt").unlink()
    else:  # garbage in the JSON metadata item
        for f in (step_dir / "metadata").iterdir():
            if f.is_file():
                f.write_bytes(b"\x00garbage{")


@pytest.mark.parametrize("how", ["truncate_data", "delete_metadata", "delete_manifest",
                                 "garbage_metadata"])
def test_restore_falls_back_to_the_newest_intact_step(tmp_path, how):
    _steps(tmp_path).close()
    _damage(tmp_path / "3", how)
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5)
    target = {"w": jnp.zeros(4)}
    with pytest.warns(RuntimeWarning, match=r"step 3 in .*Using step 2"):
        state, meta = ckpt.restore(target)
    assert meta == {"step": 2} and np.array_equal(state["w"], np.full(4, 2.0))
    assert ckpt.all_steps() == [1, 2]
    with pytest.raises(CheckpointError, match="step 3"):  # asked for by number: no fallback
        Checkpointer(tmp_path, save_every=1).restore(target, step=3)
    # Training reaches step 3 again: the broken step is replaced, not kept.
    assert ckpt.save(3, {"w": jnp.full((4,), 33.0)}, {"step": 3})
    state, meta = Checkpointer(tmp_path, save_every=1).restore(target)
    assert meta == {"step": 3} and np.array_equal(state["w"], np.full(4, 33.0))


def test_metadata_fallback_and_every_step_broken(tmp_path):
    _steps(tmp_path, 2).close()
    _damage(tmp_path / "2", "garbage_metadata")
    with pytest.warns(RuntimeWarning, match="step 2"):
        assert Checkpointer(tmp_path, save_every=1).restore_metadata() == {"step": 1}
    _damage(tmp_path / "1", "garbage_metadata")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint .*steps \[1, 2\]"):
        Checkpointer(tmp_path, save_every=1).restore_metadata()


def test_empty_and_partial_step_directories_are_ignored(tmp_path):
    _steps(tmp_path, 2).close()
    (tmp_path / "7").mkdir()  # empty
    (tmp_path / "8" / "state").mkdir(parents=True)  # no metadata item
    (tmp_path / "8" / "state" / "x").write_text("x")
    ckpt = Checkpointer(tmp_path, save_every=1, keep=5)
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    assert ckpt.restore_metadata() == {"step": 2}
    assert ckpt.save(7, {"w": jnp.ones(4)}, {"step": 7})  # what occupied the step is replaced
    assert ckpt.all_steps() == [1, 2, 7]


def test_truncate_log_keeps_one_record_per_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7))
                   + '{"step": 7, "lo')  # cut by a kill
    truncate_log(log, 4)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
    truncate_log(tmp_path / "missing.jsonl", 3)  # nothing to do
    assert not (tmp_path / "missing.jsonl").exists()


# ----------------------------------------------------------------------------- config bounds
@pytest.mark.parametrize(("field", "value"), [
    ("lr", float("inf")), ("lr", float("nan")), ("lr", 0.0), ("b1", 1.0), ("b2", 1.5), ("b1", -0.1),
    ("weight_decay", -1.0), ("weight_decay", float("inf")), ("seed", -1), ("grad_clip", float("nan"))])
def test_train_config_bounds_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"^TrainConfig.{field}=") as e:
        TrainConfig(**{field: value})
    assert "\n" not in str(e.value)


def test_pretraining_seq_len_is_bounded_by_max_positions():
    model = preset("tiny").replace(max_positions=128)
    PretrainConfig(model=model, train=TrainConfig(seq_len=128))
    with pytest.raises(ValueError, match=r"train.seq_len=256 must be <= the model's max_positions=128"):
        PretrainConfig(model=model, train=TrainConfig(seq_len=256))


# ----------------------------------------------------------------------------- user errors
def _guarded_exit(capsys, error):
    def main(argv):
        raise error

    with pytest.raises(SystemExit) as e:
        _checks.guarded(main)(["prog"])
    return e.value.code, capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.delenv(_checks.TRACEBACK_ENV, raising=False)
    code, err = _guarded_exit(capsys, ValueError("corpus path /x does not exist;\n  pass another"))
    assert (code, err) == (1, "error: corpus path /x does not exist; pass another\n")
    code, err = _guarded_exit(capsys, FileNotFoundError(2, "No such file or directory", "/x/c.json"))
    assert code == 1 and err.startswith("error: FileNotFoundError: ") and "/x/c.json" in err
    code, err = _guarded_exit(capsys, KeyboardInterrupt())
    assert (code, err) == (130, "interrupted (Ctrl-C).\n")
    with pytest.raises(TypeError):  # a bug: not caught
        _checks.guarded(lambda argv: (_ for _ in ()).throw(TypeError("bug")))(["prog"])
    monkeypatch.setenv(_checks.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError):
        _checks.guarded(lambda argv: (_ for _ in ()).throw(ValueError("shown")))(["prog"])


_THREADS_FAIL = """
import threading
from absl import logging
from experiments import _checks

def main(argv):
    def writer():  # an Orbax writer thread: logs its failure with a traceback, then re-raised in main
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            logging.exception("writer failed")
    def crasher():
        raise RuntimeError("thread boom")
    for target, name in ((writer, "writer"), (crasher, "crasher")):
        thread = threading.Thread(target=target, name=name)
        thread.start()
        thread.join()
    raise OSError(28, "No space left on device")

_checks.run(main)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_background_thread_failures_are_one_line_without_verbose(verbose):
    """A full disk fails in Orbax's writer threads first: their tracebacks are dropped, a thread's
    uncaught exception is one line, and the main thread's error is the last line."""
    done = subprocess.run([sys.executable, "-c", _THREADS_FAIL, *(["--verbose"] if verbose else [])],
                          cwd=ROOT, env={**subprocess_env(), _checks.TRACEBACK_ENV: ""},
                          capture_output=True, text=True, timeout=120)
    if verbose:
        assert done.returncode == 1 and done.stderr.count("Traceback") == 3, done.stderr
    else:
        assert done.returncode == 1 and done.stderr.splitlines() == [
            "error in thread crasher: RuntimeError: thread boom",
            "error: OSError: [Errno 28] No space left on device"], done.stderr


def test_a_tokenizer_that_cannot_be_written_is_an_os_error(tmp_path):
    from tokensparse.data import tokenizer as tokenizer_lib

    class FullDisk:  # the Rust tokenizer raises a bare Exception
        def save(self, path):
            pathlib.Path(path).write_text("{")
            raise Exception("No space left on device (os error 28)")

    with pytest.raises(OSError, match=r"cannot write .*tokenizer.json: No space left on device"):
        tokenizer_lib.save_hf_tokenizer(FullDisk(), tmp_path)
    assert list(tmp_path.iterdir()) == []  # the partial file is removed


# ----------------------------------------------------------------------------- command lines
def _cli(*args, timeout=600, **kwargs):
    return subprocess.run([sys.executable, "-m", "experiments.pretrain", *args], cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def _one_line_error(done, *needles):
    assert done.returncode == 1, (done.stdout[-2000:], done.stderr[-3000:])
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", ["workdir_is_a_file", "missing_corpus"])
def test_user_errors_on_the_command_line_are_one_line(tmp_path, case):
    workdir = tmp_path / "run"
    if case == "workdir_is_a_file":
        workdir.write_text("not a directory")
        args, needle = [], f"workdir {workdir} exists and is not a directory"
    else:
        args, needle = [f"--config.data.source={tmp_path / 'nope'}"], "nope does not exist"
    done = _cli(f"--workdir={workdir}", "--config.progress=False", *args)
    _one_line_error(done, needle)


# End to end: a tiny pretraining run on a corpus of our own (so that a file can be added to it).
WORDS = ["the", "king", "queen", "sword", "crown", "night", "day", "love", "death", "river", "stone",
         "house", "field", "war", "peace", "horse", "ship", "star", "moon", "sun", "fire", "water",
         "wind", "rain", "snow", "bread", "wine", "gold", "iron"]
STEPS, EVERY = 4, 2


def _corpus(directory: pathlib.Path, n: int = 12) -> pathlib.Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        words = rng.choice(WORDS, size=600)
        (directory / f"doc{i:02d}.txt").write_text(" ".join(words) + ".\n")
    return directory


def _args(workdir, corpus, *extra):
    return [f"--workdir={workdir}", f"--config.data.source={corpus}", "--config.data.vocab_size=300",
            "--config.train.batch_size=2", "--config.train.seq_len=64", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={EVERY}", "--config.train.eval_batches=1",
            "--config.progress=False", *extra]


def _steps_logged(workdir):
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _snapshot(workdir):
    return {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (checkpoints at steps 2 and 4) and its corpus."""
    root = tmp_path_factory.mktemp("finished")
    corpus = _corpus(root / "corpus")
    done = _cli(*_args(root / "run", corpus, f"--config.train.steps={STEPS}"))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "run", corpus


def _copy(finished, tmp_path):
    import shutil

    run, corpus = finished
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run", corpus


@pytest.mark.slow
@pytest.mark.xdist_group("run_safety")
def test_changed_settings_are_refused_before_anything_is_written(finished, tmp_path):
    workdir, corpus = _copy(finished, tmp_path)
    before = _snapshot(workdir)
    done = _cli(*_args(workdir, corpus, f"--config.train.steps={STEPS + 2}", "--config.train.lr=1e-2",
                       "--config.train.seed=7", "--config.train.batch_size=4"), timeout=300)
    _one_line_error(done, "train.batch_size: 2 -> 4", "train.lr: 0.003 -> 0.01", "train.seed: 0 -> 7",
                    "allow_changed_resume")
    assert _snapshot(workdir) == before
    added = corpus / "added.txt"  # one more file in the same corpus directory
    added.write_text(" ".join(WORDS[::-1] * 40) + ".\n")
    try:
        done = _cli(*_args(workdir, corpus, f"--config.train.steps={STEPS + 2}"), timeout=300)
    finally:
        added.unlink()
    line = _one_line_error(done, "corpus.sha256")
    fields = {c.split(":")[0] for c in line.split("other settings (")[1].split("); rerun")[0].split("; ")}
    assert "corpus.sha256" in fields and fields <= {"corpus.sha256", "tokenizer.sha256"}, line
    assert _snapshot(workdir) == before  # tokenizer.json, config.json untouched


@pytest.mark.slow
@pytest.mark.xdist_group("run_safety")
def test_allowed_change_and_more_steps_resume(finished, tmp_path):
    workdir, corpus = _copy(finished, tmp_path)
    done = _cli(*_args(workdir, corpus, f"--config.train.steps={STEPS + 2}"))  # steps: not tracked
    assert done.returncode == 0, done.stderr[-3000:]
    done = _cli(*_args(workdir, corpus, f"--config.train.steps={STEPS + 4}", "--config.train.lr=1e-3",
                       "--config.train.allow_changed_resume=True"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: resuming" in done.stderr and "train.lr: 0.003 -> 0.001" in done.stderr
    assert _steps_logged(workdir) == list(range(1, STEPS + 5))
    record = json.loads((workdir / "fingerprint.json").read_text())
    assert record["fingerprint"]["train.lr"] == 1e-3
    assert record["changes"] == [{"from_step": STEPS + 2, "changed": ["train.lr: 0.003 -> 0.001"]}]


@pytest.mark.slow
@pytest.mark.xdist_group("run_safety")
def test_a_broken_latest_checkpoint_falls_back_and_is_replaced(finished, tmp_path):
    workdir, corpus = _copy(finished, tmp_path)
    _damage(workdir / "checkpoints" / str(STEPS), "truncate_data")
    (workdir / "checkpoints" / "40").mkdir()  # an empty step directory: not a checkpoint
    done = _cli(*_args(workdir, corpus, f"--config.train.steps={STEPS + 2}"))
    assert done.returncode == 0, done.stderr[-3000:]
    warned = [line for line in done.stderr.splitlines() if line.startswith("warning: ")]
    assert any(f"checkpoint step {STEPS} in" in w and f"Using step {STEPS - EVERY}" in w
               for w in warned), done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    # Resumed from step 2: steps 3 and 4 logged again, once each; step 4 saved anew.
    assert _steps_logged(workdir) == list(range(1, STEPS + 3))
    with Checkpointer(workdir / "checkpoints", save_every=1) as ckpt:
        assert ckpt.latest_step() == STEPS + 2 and STEPS in ckpt.all_steps()
        assert ckpt.restore_metadata(STEPS)["step"] == STEPS


def _start(workdir, corpus, steps=100000):
    return subprocess.Popen([sys.executable, "-m", "experiments.pretrain",
                             *_args(workdir, corpus, f"--config.train.steps={steps}",
                                    "--config.train.checkpoint_every=100000")],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc, workdir, n, timeout=400):
    deadline = time.time() + timeout
    log = workdir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        time.sleep(0.3)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    raise AssertionError(f"no {n} steps logged: {err[-3000:]}")


@pytest.mark.slow
@pytest.mark.xdist_group("run_safety")
def test_lock_sigterm_and_kill_through_the_command_line(finished, tmp_path):
    workdir, corpus = _copy(finished, tmp_path)
    first = _start(workdir, corpus)
    try:
        _wait_for_steps(first, workdir, STEPS + 2)
        # A second process on the same workdir: refused at once, naming the first.
        second = _cli(*_args(workdir, corpus, "--config.train.steps=100000"), timeout=300)
        _one_line_error(second, f"pid {first.pid} on host {socket.gethostname()}", str(workdir))
        # SIGTERM: the first saves a checkpoint and exits 143, without a final summary or export.
        summary_before = (workdir / "summary.json").read_bytes()
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    saved = _saved_steps(workdir)[-1]
    assert saved > STEPS and _steps_logged(workdir) == list(range(1, saved + 1))
    assert (workdir / "summary.json").read_bytes() == summary_before  # the finished run's, untouched
    assert not (workdir / ".lock").exists()
    # kill -9 mid-run: no checkpoint since `saved`, its later steps logged, its lock file left.
    third = _start(workdir, corpus)
    try:
        _wait_for_steps(third, workdir, saved + 3)
    finally:
        third.kill()
        third.wait()
    assert json.loads((workdir / ".lock").read_text())["pid"] == third.pid
    assert _saved_steps(workdir)[-1] == saved and len(_steps_logged(workdir)) >= saved + 3
    done = _cli(*_args(workdir, corpus, f"--config.train.steps={saved + 1}"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"warning: taking over the stale lock {workdir / '.lock'} of pid {third.pid}" in done.stderr
    assert _steps_logged(workdir) == list(range(1, saved + 2))  # one record per step


@pytest.mark.slow
@pytest.mark.xdist_group("run_safety")
def test_finetune_resumes_the_same_settings_and_refuses_others(finished, tmp_path):
    base, corpus = finished
    workdir = tmp_path / "ft"
    args = ["-m", "experiments.finetune", f"--config={ROOT / 'experiments/configs/finetune_tiny.py'}",
            f"--workdir={workdir}", f"--config.base={base}", f"--config.data.source={corpus}",
            "--config.train.seq_len=128", "--config.train.batch_size=1", "--config.train.log_every=1",
            "--config.train.checkpoint_every=1", "--config.train.eval_batches=1",
            "--config.progress=False"]

    def finetune(*extra, timeout=600):
        return subprocess.run([sys.executable, *args, *extra], cwd=ROOT, env=subprocess_env(),
                              capture_output=True, text=True, timeout=timeout)

    done = finetune("--config.train.steps=2")
    assert done.returncode == 0, done.stderr[-3000:]
    done = finetune("--config.train.steps=3")  # the same settings, more steps: resumes
    assert done.returncode == 0, done.stderr[-3000:]
    assert _steps_logged(workdir) == [1, 2, 3]
    before = _snapshot(workdir)
    done = finetune("--config.train.steps=4", "--config.lora.rank=4", timeout=300)
    _one_line_error(done, "lora.rank: 8 -> 4")
    assert _snapshot(workdir) == before
