"""Input checks that turn silent wrong answers into errors: token ids and routing indices.

JAX does not raise on an out-of-range index: ``jnp.take`` fills with NaN (an embedding lookup of an
id ≥ vocab makes the whole row's logits NaN) or wraps negative ids, gathers clamp, scatters drop.
So the library checks where it can:

- **Concrete arrays** (eager calls, NumPy inputs): :func:`check_token_ids` raises a one-line
  ``ValueError`` naming the bad id and the vocabulary size. The model's embedding, ``generate`` and
  the pipelines' data path call it.
- **Traced arrays** (inside ``jax.jit`` / ``nnx.jit``, a train step) cannot be inspected while
  tracing, so by default nothing is checked there. Turn on the debug checks (:func:`debug_checks`,
  or ``TOKENSPARSE_DEBUG_CHECKS=1`` in the environment) and wrap the function in
  ``jax.experimental.checkify.checkify``: the checks are then staged into the computation and the
  returned error names the bad value::

      with validation.debug_checks():
          err, loss = checkify.checkify(step)(model, batch)
      err.throw()  # ValueError-like JaxRuntimeError: "token id 9 is outside [0, vocab_size=8)"

  The switch is read when a function is traced (a cached compilation keeps what it was traced with),
  and a debug-mode function traced under ``jit`` without ``checkify`` fails to trace, saying it needs
  ``checkify.checkify``. Debug checks also make :func:`tokensparse.routing.gather` and
  :func:`~tokensparse.routing.scatter_add` check their selections' indices (eagerly on concrete
  indices, staged on traced ones).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

DEBUG_ENV = "TOKENSPARSE_DEBUG_CHECKS"
_DEBUG: contextvars.ContextVar[bool | None] = contextvars.ContextVar("tokensparse_debug", default=None)


def debug_enabled() -> bool:
    """Whether debug checks are on: the innermost :func:`debug_checks`, else ``$TOKENSPARSE_DEBUG_CHECKS``."""
    value = _DEBUG.get()
    if value is not None:
        return value
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


@contextlib.contextmanager
def debug_checks(enabled: bool = True):
    """Turn the debug checks on (or off) for the functions traced inside this block."""
    token = _DEBUG.set(bool(enabled))
    try:
        yield
    finally:
        _DEBUG.reset(token)


def is_traced(x) -> bool:
    """True for a tracer (a value inside jit / grad / vmap), whose contents are unknown."""
    return isinstance(x, jax.core.Tracer)


def _first_bad(ok: np.ndarray, values: np.ndarray) -> tuple[int, tuple[int, ...]]:
    where = np.argwhere(~ok)[0]
    return int(values[tuple(where)]), tuple(int(i) for i in where)


def check_token_ids(tokens, vocab_size: int, *, what: str = "token ids") -> None:
    """ValueError unless every id in ``tokens`` is in ``[0, vocab_size)``.

    An id past the embedding table silently gives NaN logits and a negative one wraps around, so
    eager entry points call this. Traced ``tokens`` are checked only in debug mode, under
    ``checkify`` (module docstring)."""
    if is_traced(tokens):
        if debug_enabled():
            flat = jnp.ravel(tokens)
            ok = (flat >= 0) & (flat < vocab_size)
            bad = flat[jnp.argmin(ok)]
            checkify.check(jnp.all(ok), f"{what}: token id {{bad}} is outside [0, vocab_size="
                           f"{vocab_size}).", bad=bad)
        return
    # A concrete array (also one captured by a function being traced, where jnp reductions would
    # be staged): check on the host; token arrays are small.
    values = np.asarray(tokens)
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {values.dtype}.")
    ok = (values >= 0) & (values < vocab_size)
    if ok.all():
        return
    bad, index = _first_bad(ok, values)
    hint = ("negative ids are padding or a bug; mask them instead" if bad < 0 else
            f"use the tokenizer that matches the model (or a model with vocab_size > {int(values.max())})")
    raise ValueError(f"{what} must be in [0, vocab_size={vocab_size}) but id {bad} (at index "
                     f"{index}) is not; the max id is {int(values.max())}, the min {int(values.min())}: "
                     f"{hint}.")


def check_indices(indices, valid, bound: int, *, what: str) -> None:
    """Debug mode only: every ``indices`` entry with ``valid`` True lies in ``[0, bound)``.

    Eager ``ValueError`` on concrete arrays, a staged ``checkify.check`` on traced ones."""
    if not debug_enabled():
        return
    if is_traced(indices) or is_traced(valid):
        ok = ~valid | ((indices >= 0) & (indices < bound))
        bad = jnp.ravel(indices)[jnp.argmin(jnp.ravel(ok))]
        checkify.check(jnp.all(ok), f"{what}: index {{bad}} is outside [0, {bound}).", bad=bad)
        return
    indices, valid = np.asarray(indices), np.asarray(valid)
    ok = ~valid | ((indices >= 0) & (indices < bound))
    if not ok.all():
        bad, index = _first_bad(ok, indices)
        raise ValueError(f"{what}: index {bad} (at {index}) is outside [0, {bound}).")


__all__ = ["DEBUG_ENV", "check_indices", "check_token_ids", "debug_checks", "debug_enabled",
           "is_traced"]


def json_object(file: str | os.PathLike) -> dict:
    """The JSON object in ``file``; a one-line ValueError naming the file when it is not one."""
    file = pathlib.Path(file)
    try:
        value = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file} must hold a JSON object, not {type(value).__name__}.")
    return value
