"""One thin wrapper over ``orbax.checkpoint.CheckpointManager``: save / restore / latest_step.

Each step directory holds two items: ``state`` (a pytree of arrays, Orbax StandardSave) and
``metadata`` (a JSON dict: step, data position, configs), so the config can be checked before the
model is built. Saving is synchronous: when ``save`` returns, the step is finalised (Orbax writes
into a temporary directory and renames it), so a process exiting right after never leaves a partial
checkpoint as the latest one; unfinished temporary directories are never listed and are cleaned up.

PRNG keys: typed keys (``jax.random.key``) are stored as their raw ``uint32`` key data. ``restore``
re-wraps them when the abstract target holds a typed key (same impl), and returns raw data when the
target holds raw data, so callers may convert themselves (``jax.random.key_data``) or not.

Restores are checked against the stored tree metadata first: Orbax silently casts dtypes and
reports shape errors without naming the leaf, and a resumed run must never continue on garbage.

Damage on disk: a step directory without both items (empty, or left half-copied by hand) is not a
checkpoint and is never listed. A listed step that cannot be read (a truncated data file, deleted or
garbage metadata) is skipped when restoring the latest step: the newest intact step is restored
instead, with a one-line warning naming the broken one, and the broken one is replaced when training
reaches its step again. Asking for a specific step never falls back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

_MAX_LISTED = 10  # mismatching leaves named in one error message
ITEMS = ("state", "metadata")  # every step directory holds both
_WARNED: set[tuple[str, int]] = set()  # broken steps already reported by this process


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, unreadable, or does not match the requested state."""


class CorruptCheckpoint(CheckpointError):
    """A step's files cannot be read (truncated, deleted or garbage): restoring the latest step
    falls back past it."""


class _QuietMissingMetadata(logging.Filter):
    """Orbax logs a warning for each step directory without its metadata file every time it lists
    the steps; those directories are not checkpoints here (never listed), so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Metadata file does not exist",
                                               "Given directory is read only"))  # read_only=True


logging.getLogger("absl").addFilter(_QuietMissingMetadata())


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_impl(x):
    """The PRNG impl of a typed key, concrete or abstract (``key_impl`` rejects abstract ones)."""
    if isinstance(x, jax.Array):
        return jax.random.key_impl(x)
    box = []
    jax.eval_shape(lambda k: box.append(jax.random.key_impl(k)), x)
    return box[0]


def _storable(tree):
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_storable(tree):
    """Target pytree of ShapeDtypeStructs (typed keys → their key data) carrying the shardings."""

    def leaf(x):
        shape, dtype = tuple(x.shape), x.dtype
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(shape, dtype))
            shape, dtype = data.shape, data.dtype
        return jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(x, "sharding", None))

    return jax.tree.map(leaf, tree)


def _path_str(path) -> str:
    """'opt/opt_state/0/mu/embed/value': the same string for a dict key, attribute or index."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _specs(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(p): (tuple(x.shape), np.dtype(x.dtype)) for p, x in leaves}


def _describe_mismatch(stored: dict, target: dict) -> list[str]:
    problems = []
    for path in sorted(set(stored) | set(target)):
        if path not in stored:
            t_shape, t_dtype = target[path]
            problems.append(f"{path}: not in checkpoint (target {t_shape} {t_dtype})")
        elif path not in target:
            problems.append(f"{path}: in checkpoint {stored[path][0]} {stored[path][1]}, "
                            "missing from target")
        elif stored[path] != target[path]:
            (s_shape, s_dtype), (t_shape, t_dtype) = stored[path], target[path]
            problems.append(f"{path}: checkpoint {s_shape} {s_dtype}, target {t_shape} {t_dtype}")
    return problems


def _unreadable(where: str, e: Exception, limit: int = 240) -> CheckpointError:
    """The cause in one line (TensorStore errors run to pages; the exception chain keeps them)."""
    cause = f"{type(e).__name__}: {e}".replace("\n", " ")
    cause = cause if len(cause) <= limit else cause[:limit] + " ..."
    return CorruptCheckpoint(f"cannot read {where} (corrupt or incomplete?): {cause}")


@contextlib.contextmanager
def _quiet_aborted_reads():
    """When a read fails, Orbax closes its event loop while TensorStore still completes the other
    reads of the step; each completion then reports "Event loop is closed" as an unraisable
    exception (a page of tracebacks per damaged checkpoint). Those, and only those, are dropped
    here: the failure itself is raised (or warned about) in one line."""
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


class Checkpointer:
    """Saves every ``save_every`` steps into ``directory/<step>``, keeping the ``keep`` latest."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 read_only: bool = False):
        """``read_only``: only read (no directory made, no temporary directories cleaned up),
        e.g. to load a run that may still be training."""
        if save_every < 1 or keep < 1:
            raise ValueError(f"Checkpointer needs save_every >= 1 and keep >= 1, got save_every="
                             f"{save_every}, keep={keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = save_every
        self.broken_steps: set[int] = set()  # found unreadable: skipped, replaced when saved again
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, create=not read_only,
            cleanup_tmp_directories=not read_only, read_only=read_only,
            **({"save_interval_steps": 0} if read_only else {}),
            enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "metadata": ocp.JsonCheckpointHandler()})

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0

    def save(self, step: int, state, metadata: dict, *, force: bool = False) -> bool:
        """Save when ``should_save(step)`` or ``force``; a step already on disk is left unchanged.

        Returns whether a checkpoint was written; it is complete on disk when this returns.
        """
        if not (force or self.should_save(step)) or step in self.all_steps():
            return False
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata for step {step} is not JSON-serialisable: {e}; "
                            "store configs as dicts (e.g. config.to_dict()).") from e
        self._remove_unusable(step)
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_storable(state)),
            metadata=ocp.args.JsonSave(metadata)))
        self._manager.wait_until_finished()
        return True

    def all_steps(self) -> list[int]:
        """Finalised steps, ascending (re-read from disk: another process may have written), without
        directories that lack an item (empty or partial) and steps found unreadable."""
        self._manager.reload()
        return sorted(s for s in self._manager.all_steps()
                      if s not in self.broken_steps and self._complete(s))

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _complete(self, step: int) -> bool:
        path = self._step_dir(step)
        return all(os.path.isdir(os.path.join(path, item)) and os.listdir(os.path.join(path, item))
                   for item in ITEMS)

    def _remove_unusable(self, step: int) -> None:
        """Before saving ``step``: delete what occupies its directory without being a usable
        checkpoint (an empty or partial directory, a step found unreadable), which Orbax would
        otherwise refuse to overwrite."""
        path = self._step_dir(step)
        if os.path.exists(path) and (step in self.broken_steps or not self._complete(step)):
            if jax.process_index() == 0:
                shutil.rmtree(path)
            self.broken_steps.discard(step)
            self._manager.reload()

    def _warn_broken(self, errors: dict[int, CorruptCheckpoint], used: int) -> None:
        for step, error in errors.items():
            if (self.directory, step) not in _WARNED:
                _WARNED.add((self.directory, step))
                warnings.warn(f"{error} Using step {used}, the newest intact checkpoint.",
                              RuntimeWarning, stacklevel=4)

    def _newest_first(self, step: int | None):
        """The steps to try: ``step`` alone when given, else every step from the newest down."""
        if step is not None:
            yield self._resolve(step)
            return
        self._resolve(None)  # raises when there is none
        yield from reversed(self.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}.")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; "
                                  f"available steps: {steps}.")
        return step

    def _with_fallback(self, read, step: int | None):
        """``read(step)`` for ``step``, or (None) for the newest step it succeeds on: a
        :class:`CorruptCheckpoint` marks that step broken, warns, and moves on to the previous one."""
        errors: dict[int, CorruptCheckpoint] = {}
        with _quiet_aborted_reads():
            for candidate in self._newest_first(step):
                try:
                    result = read(candidate)
                except CorruptCheckpoint as e:
                    if step is not None:
                        raise
                    errors[candidate] = e
                    self.broken_steps.add(candidate)
                    continue
                self._warn_broken(errors, candidate)
                return result
        newest = next(iter(errors.values()))
        raise CorruptCheckpoint(f"no intact checkpoint in {self.directory} (steps {sorted(errors)} "
                                f"are unreadable; move the directory aside to start afresh); the "
                                f"newest: {newest}") from newest

    def restore_metadata(self, step: int | None = None) -> dict:
        """Only the JSON metadata: cheap, e.g. to check the saved config before building a model.
        Without ``step``: the newest step whose metadata can be read."""
        return self._with_fallback(self._read_metadata, step)

    def _read_metadata(self, step: int) -> dict:
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
            metadata = restored["metadata"]
            if not isinstance(metadata, dict):
                raise TypeError(f"metadata is a {type(metadata).__name__}, not a JSON object")
        except Exception as e:
            raise _unreadable(f"metadata of checkpoint step {step} in {self.directory}", e) from e
        return dict(metadata)

    def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
        """Restore ``step`` (default: the newest intact one) into the structure, dtypes and
        shardings of ``abstract_state`` (ShapeDtypeStructs or arrays). Returns ``(state,
        metadata)``; ``metadata["step"]`` (when the saver stored it) says which step it was."""
        return self._with_fallback(lambda s: self._restore(abstract_state, s), step)

    def _restore(self, abstract_state, step: int) -> tuple[Any, dict]:
        where = f"checkpoint step {step} in {self.directory}"
        metadata = self._read_metadata(step)
        target = _abstract_storable(abstract_state)
        try:
            stored = self._manager.item_metadata(step)["state"]
            if stored is None:  # Orbax's answer when the state's _METADATA is gone
                raise FileNotFoundError("the state item has no readable tree metadata (_METADATA)")
            stored_specs = _specs(stored)
        except Exception as e:
            raise _unreadable(where, e) from e
        problems = _describe_mismatch(stored_specs, _specs(target))
        if problems:
            listed = problems[:_MAX_LISTED] + (
                [f"... {len(problems) - _MAX_LISTED} more"] if len(problems) > _MAX_LISTED else [])
            raise CheckpointError(f"{where} does not match the target state "
                                  f"({len(problems)} leaves differ):\n  " + "\n  ".join(listed))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target)))
        except Exception as e:
            raise _unreadable(where, e) from e
        state = jax.tree.map(
            lambda x, ref: jax.random.wrap_key_data(x, impl=_key_impl(ref)) if _is_key(ref) else x,
            restored["state"], abstract_state)
        return state, metadata

    def restore_items(self, names: tuple[str, ...], step: int | None = None) -> tuple[dict, dict]:
        """Only the top-level entries ``names`` of the saved state (e.g. ``("params",)``: a run's
        weights without its optimizer state), as host arrays in the nested-dict structure they
        were saved in (string keys), and the metadata; nothing else of the step is read. Without
        ``step``: the newest step that reads (falling back like :meth:`restore`)."""
        return self._with_fallback(lambda s: self._restore_items(tuple(names), s), step)

    def _restore_items(self, names: tuple[str, ...], step: int) -> tuple[dict, dict]:
        where = f"checkpoint step {step} in {self.directory}"
        metadata = self._read_metadata(step)
        try:
            stored = self._manager.item_metadata(step)["state"]
            if stored is None:
                raise FileNotFoundError("the state item has no readable tree metadata (_METADATA)")
            absent = [n for n in names if n not in stored]
        except Exception as e:
            raise _unreadable(where, e) from e
        if absent:
            raise CheckpointError(f"{where} holds no {absent}; it holds {sorted(stored)}.")
        target = {n: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), stored[n])
                  for n in names}
        try:  # StandardSave writes a PyTree checkpoint, whose handler can read part of it
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
                part = reader.restore(os.path.join(self._step_dir(step), "state"),
                                      args=ocp.args.PyTreeRestore(
                                          item=target, partial_restore=True,
                                          restore_args=ocp.checkpoint_utils.construct_restore_args(
                                              target)))
        except Exception as e:
            raise _unreadable(where, e) from e
        return dict(part), metadata

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InterruptGuard:
    """Turns SIGTERM / SIGINT into a flag so the training loop can save and exit between steps.

    Preemptions (SIGTERM) and Ctrl-C mid-step would otherwise lose everything since the last
    checkpoint. A second SIGINT raises ``KeyboardInterrupt`` so a stuck run can still be stopped.
    Previous handlers come back on exit. Outside the main thread (where Python cannot install
    handlers) the guard does nothing and ``requested`` stays False.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    last_signal: str | None = None  # the latest signal any guard caught (for callers whose loop
    # reports only that it was interrupted, not by what)

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = InterruptGuard.last_signal = signal.Signals(signum).name

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()
