"""A run's directory: made safely, held exclusively while the run lasts.

Two processes training into one workdir corrupt it (interleaved metrics, checkpoints racing each
other), so every pipeline holds :func:`lock` for the whole run. The lock is an ``flock`` on
``workdir/.lock``, which also records who holds it (pid, host, start time, command):

- a second process gets :class:`WorkdirBusy` at once, naming the holder;
- the kernel drops an ``flock`` when its process dies, however it dies (``kill -9`` included), so a
  crashed run never blocks the next one: the file it leaves behind only names it, and the next run
  takes it over with a one-line warning;
- where the file system cannot ``flock`` (some network mounts), the recorded pid decides: a holder
  on this host whose pid is gone is stale and taken over; one on another host is respected.

Several processes of one multi-host run share a workdir: process ``i > 0`` locks ``.lock.<i>``, so a
second run is refused on every host while the processes of one run never block each other.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import pathlib
import socket
import sys
import warnings

LOCK = ".lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirBusy(OSError):
    """Another live process holds the workdir's lock."""


def prepare(workdir: str | os.PathLike) -> pathlib.Path:
    """``workdir`` as a path, created (with its parents) unless it exists; ValueError when it
    names something that is not a directory."""
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir {path} exists and is not a directory; pass a directory (a new "
                         "one starts a run, an existing one resumes it).")
    path.mkdir(parents=True, exist_ok=True)
    return path


def lock_name(process_index: int = 0) -> str:
    return LOCK if process_index == 0 else f"{LOCK}.{process_index}"


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


def _read_holder(fd: int) -> dict | None:
    """What the lock file says (None: empty; a garbled file counts as an unknown holder)."""
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 1 << 16):
        raw += chunk
    if not raw.strip():
        return None
    try:
        holder = json.loads(raw)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown process"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
            f" (since {holder.get('since', '?')})")


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(holder: dict) -> bool:
    """Without flock: a holder is known gone only when it ran on this host and its pid is dead."""
    return holder.get("host") == socket.gethostname() and not _pid_alive(holder.get("pid"))


def _busy(path: pathlib.Path, holder: dict | None) -> WorkdirBusy:
    return WorkdirBusy(f"workdir {path.parent} is in use by {_describe(holder)} (lock {path}); "
                       "wait for that run to end or stop it, or pass another --workdir.")


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: the file system cannot flock."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return None
        raise
    return True


def _acquire(path: pathlib.Path) -> int:
    """Open and lock ``path``; returns the descriptor. Retries when the file was replaced between
    the open and the lock (its holder released it meanwhile)."""
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _try_flock(fd)
            previous = _read_holder(fd)
            if locked is False:
                raise _busy(path, previous)
            if locked is None and previous is not None and not _stale(previous):
                raise _busy(path, previous)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and unlinked between our open and flock: lock the new file
                os.close(fd)
                continue
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if previous is not None:
            warnings.warn(f"taking over the stale lock {path} of {_describe(previous)}: that process "
                          "is gone (it did not exit cleanly).", RuntimeWarning, stacklevel=4)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(_holder()).encode())
        os.fsync(fd)
        return fd
    raise _busy(path, None)


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, process_index: int | None = None):
    """Hold ``workdir``'s lock inside the ``with`` block (the workdir must exist).

    Raises :class:`WorkdirBusy` naming the holder when another live process has it; released on
    exit, exceptions included (a killed process's lock is released by the kernel and taken over
    by the next run)."""
    if process_index is None:
        import jax

        process_index = jax.process_index()
    path = pathlib.Path(workdir) / lock_name(process_index)
    fd = _acquire(path)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before unlocking: a waiting opener then sees a new file (retry above)
        os.close(fd)

