"""One backend dispatcher for the operations with several implementations (``"attention"``,
``"block_scores"``).

Each operation (a *kind*) has a table of named :class:`Backend` s and a fallback name. The rule:

- a backend named explicitly runs, or, when it cannot run these inputs here, :func:`resolve` raises a
  one-line ``ValueError`` saying why and what to use instead (never a silent substitute);
- ``"auto"`` picks the highest-priority backend (priority > 0) that supports the inputs, else the
  kind's fallback; it never raises for lack of support.

:func:`resolve` returns the name that will run, so callers (benchmarks) can record it; it accepts
``jax.ShapeDtypeStruct`` s, since support depends only on shapes, dtypes and the platform.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

AUTO = "auto"


def _always(*args, **kwargs) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class Backend:
    """An implementation of one kind of operation.

    ``supports`` takes the arguments :func:`resolve` is given for its kind and returns None when the
    backend can run them on the current platform, or a short reason why not. ``priority`` orders
    the candidates of ``"auto"`` (higher first; only priorities > 0 are candidates).
    """

    fn: Callable[..., Any]
    supports: Callable[..., str | None] = _always
    priority: int = 0


_TABLES: dict[str, dict[str, Backend]] = {}
_FALLBACKS: dict[str, str] = {}


def define(kind: str, fallback: str) -> None:
    """Declare an operation; ``fallback`` (registered later) is what ``"auto"`` runs when no
    candidate supports the inputs."""
    _TABLES.setdefault(kind, {})
    _FALLBACKS[kind] = fallback


def register(kind: str, name: str, backend: Backend) -> None:
    """Make ``backend`` selectable as ``name`` for ``kind`` (and by ``"auto"`` if its priority > 0)."""
    if name == AUTO:
        raise ValueError(f"{AUTO!r} is not a backend name: it asks the dispatcher to choose.")
    _table(kind)[name] = backend


def unregister(kind: str, name: str) -> None:
    """Remove ``name`` from ``kind``'s table (no error when absent)."""
    _table(kind).pop(name, None)


def names(kind: str) -> list[str]:
    """The registered backend names of ``kind``, sorted (``"auto"`` is not one of them)."""
    return sorted(_table(kind))


def get(kind: str, name: str) -> Backend:
    """The backend registered as ``name`` (an unknown name raises)."""
    table = _table(kind)
    if name not in table:
        raise ValueError(f"Unknown {kind} backend {name!r}; choose {AUTO!r} or one of "
                         f"{names(kind)}.")
    return table[name]


def resolve(kind: str, name: str, *args, **kwargs) -> str:
    """The backend name that runs ``kind`` for these arguments when ``name`` is asked for.

    ``args``/``kwargs`` are what the kind's ``supports`` functions take (arrays or
    ``ShapeDtypeStruct`` s). A named backend that cannot run them raises ``ValueError``.
    """
    if name == AUTO:
        return _auto(kind, *args, **kwargs)
    reason = get(kind, name).supports(*args, **kwargs)
    if reason is not None:
        instead = _auto(kind, *args, **kwargs)
        raise ValueError(f"{kind} backend {name!r} cannot run here: {reason}. Use backend="
                         f"{instead!r} (what {AUTO!r} picks here) instead.")
    return name


def _auto(kind: str, *args, **kwargs) -> str:
    table = _table(kind)
    ranked = sorted(table.items(), key=lambda item: -item[1].priority)  # stable: ties keep order
    for name, backend in ranked:
        if backend.priority > 0 and backend.supports(*args, **kwargs) is None:
            return name
    return _FALLBACKS[kind]


def _table(kind: str) -> dict[str, Backend]:
    if kind not in _TABLES:
        raise ValueError(f"Unknown operation {kind!r}; defined: {sorted(_TABLES)}.")
    return _TABLES[kind]
