"""Command-line checks every entry point shares, so a bad flag costs seconds, not a compile.

- :func:`run` is ``absl.app.run`` with two changes: ``--help`` / ``-h`` / ``--helpshort`` exit 0 (absl
  exits 1), and an override of a field the config does not have (``--config.train.stepz=3``, which
  ``ml_collections`` reports as a bare ``KeyError`` traceback) becomes a one-line error naming it.
- The validators (:func:`int_list`, :func:`at_least`, :func:`same_length`) run while absl parses
  the flags, before ``main`` and therefore before anything is built or compiled; absl reports a
  failure as ``FATAL Flags parsing error: flag --NAME=VALUE: why`` and exits 1.
- :func:`fail` reports an error found later (a config value) in that same format.
- While ``main`` runs, a user error (``ValueError`` and its kin, ``OSError``: a missing corpus, a bad
  Hugging Face directory, a workdir that is a file or is locked by another run, a diverged loss) is
  one line on stderr, ``error: ...``, and exit 1; Ctrl-C before the training loop is ``interrupted``
  and exit 130, SIGTERM exit 143 (``finally`` blocks run: the workdir lock is released). The
  traceback is shown with ``--verbose`` or ``TOKENSPARSE_TRACEBACK=1``. Anything else is a bug and
  keeps its traceback.
- Background threads (Orbax's checkpoint writers) log their failure with a traceback before the main
  thread re-raises it (a full disk: dozens of tracebacks). Without ``--verbose`` those records are
  dropped and an exception that ends a thread is one line (``error in thread NAME: ...``); the main
  thread's one-line error reports the failure.

The only flag defined here is ``--verbose``; the experiment scripts' own (multi-host) flags live in
``_cli``, which benchmarks do not import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from typing import NoReturn

from absl import app, flags

HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
TRACEBACK_ENV = "TOKENSPARSE_TRACEBACK"

_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the full traceback of an error (also: "
                             f"environment variable {TRACEBACK_ENV}=1); without it an error in "
                             "the input is one line.")


def fail(message: str) -> NoReturn:
    """Exit 1 with absl's flag-error format (the same first words as a flag that fails to parse)."""
    sys.stderr.write(f"FATAL Flags parsing error: {message}\n"
                     "Pass --help to see the flags.\n")
    sys.exit(1)


def unknown_field_message(error: Exception, argv: Sequence[str]) -> str:
    """Which ``--config.a.b`` override names a missing field, from ml_collections' KeyError text
    (``'stepz'`` plus, when it has one, ``Did you mean "steps" instead of "stepz"?``)."""
    text = str(error.args[0] if error.args else error).replace("\\n", "\n")
    names = re.findall(r"'([^'\\]+)", text)
    field = names[0] if names else text
    hint = re.search(r'Did you mean "([^"]+)"', text)
    given = [a.split("=", 1)[0] for a in argv if re.match(r"-{1,2}(no)?config\.", a)]
    flag = next((g for g in given if field in g.split(".")[1:]), given[0] if given else "--config")
    return (f"flag {flag}: the config has no field {field!r}"
            + (f"; did you mean {hint.group(1)!r}?" if hint else "."))


@contextlib.contextmanager
def config_overrides_checked(argv: Sequence[str] | None = None):
    """Turn ml_collections' error for an override of a missing field into :func:`fail`.

    Needed around ``DEFINE_config_file`` too: without ``--config=FILE`` on the command line,
    ml_collections applies the overrides while the flag is being defined."""
    try:
        yield
    except (KeyError, AttributeError) as e:
        fail(unknown_field_message(e, sys.argv if argv is None else argv))


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run``'s ``flags_parser``: help exits 0; flag errors print one line and exit 1."""
    if any(a in HELP for a in argv[1:]):
        app.usage(shorthelp=True, writeto_stdout=True, exitcode=0)
    try:
        with config_overrides_checked(argv):
            return flags.FLAGS(argv)
    except flags.Error as e:
        fail(str(e))


class Terminated(SystemExit):
    """SIGTERM outside the training loop (whose own handler saves a checkpoint first): exit 143
    after ``finally`` blocks (the workdir lock) have run."""

    def __init__(self):
        super().__init__(128 + signal.SIGTERM)


def _terminate(signum, frame) -> None:
    raise Terminated()


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that report bad input rather than a bug: one line, no traceback."""
    errors: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)
    with contextlib.suppress(ImportError):
        from safetensors import SafetensorError

        errors += (SafetensorError,)
    return errors


def one_line(error: BaseException) -> str:
    """``error`` as one line: its message's lines joined; the type named unless it is a ValueError
    (whose message says what was wrong) ."""
    message = " ".join(str(error).split()) or "(no message)"
    return message if isinstance(error, ValueError) else f"{type(error).__name__}: {message}"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {' '.join(str(message).split())}\n"


def traceback_wanted() -> bool:
    env = os.environ.get(TRACEBACK_ENV, "").strip().lower()
    return env not in ("", "0", "false", "no") or (flags.FLAGS.is_parsed() and _VERBOSE.value)


class _BackgroundTracebacks(logging.Filter):
    """Drop error records that carry a traceback from threads other than the main one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.levelno >= logging.ERROR
                    and record.thread != threading.main_thread().ident)


def _one_line_thread_error(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is not SystemExit:
        name = args.thread.name if args.thread else "?"
        sys.stderr.write(f"error in thread {name}: {one_line(args.exc_value)}\n")


@contextlib.contextmanager
def quiet_background_threads():
    """Background threads' failures as at most one line each (see the module docstring)."""
    quiet, hook = _BackgroundTracebacks(), threading.excepthook
    handlers = [h for h in (*logging.getLogger().handlers, logging.lastResort) if h is not None]
    for handler in handlers:
        handler.addFilter(quiet)
    threading.excepthook = _one_line_thread_error
    try:
        yield
    finally:
        threading.excepthook = hook
        for handler in handlers:
            handler.removeFilter(quiet)


def guarded(main):
    """``main`` with user errors as one line (exit 1), Ctrl-C as exit 130 and SIGTERM as exit 143
    (unless a traceback is wanted: see :func:`traceback_wanted`)."""
    def wrapped(argv):
        if not traceback_wanted():  # warnings too are one line (a taken-over lock, a broken step)
            warnings.formatwarning = _one_line_warning
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            with contextlib.suppress(ValueError):  # not the main thread: keep the default
                signal.signal(signal.SIGTERM, _terminate)
        try:
            with (contextlib.nullcontext() if traceback_wanted() else quiet_background_threads()):
                return main(argv)
        except Terminated:
            sys.stderr.write("terminated (SIGTERM).\n")
            raise
        except KeyboardInterrupt:
            if traceback_wanted():
                raise
            sys.stderr.write("interrupted (Ctrl-C).\n")
            sys.exit(128 + signal.SIGINT)
        except user_errors() as e:
            if traceback_wanted():
                raise
            sys.stderr.write(f"error: {one_line(e)}\n")
            sys.exit(1)

    return wrapped


def run(main) -> None:
    app.run(guarded(main), flags_parser=parse_flags)


def attention_backends() -> tuple[str, ...]:
    """Names an ``--attention`` / ``config.attention_backend`` may take."""
    from tokensparse import attention

    return ("auto", *attention.backends())


def _check_int(v: int, minimum: int, multiple_of: int, why: str) -> None:
    if v < minimum:
        raise flags.ValidationError(f"{v} must be >= {minimum}.")
    if v % multiple_of:
        raise flags.ValidationError(f"{v} must be a multiple of {multiple_of}"
                                    + (f" ({why})" if why else "") + ".")


def int_list(holder: flags.FlagHolder, *, minimum: int = 1, multiple_of: int = 1,
             why: str = "") -> None:
    """Validate a ``DEFINE_list`` of integers: each >= ``minimum`` and a multiple of ``multiple_of``
    (``why`` says what needs it). absl's message starts ``flag --NAME=VALUE:``."""
    def check(values) -> bool:
        if not values:
            raise flags.ValidationError("give at least one value.")
        for v in values:
            try:
                number = int(v)
            except ValueError:
                raise flags.ValidationError(f"{v!r} is not an integer (comma-separated integers, "
                                            "e.g. 2048,4096).") from None
            _check_int(number, minimum, multiple_of, why)
        return True

    flags.register_validator(holder, check)


def at_least(holder: flags.FlagHolder, minimum: int, *, multiple_of: int = 1, why: str = "") -> None:
    """Validate an integer flag: >= ``minimum`` and a multiple of ``multiple_of``."""
    def check(value) -> bool:
        if value is not None:
            _check_int(value, minimum, multiple_of, why)
        return True

    flags.register_validator(holder, check)


def one_of(holder: flags.FlagHolder, allowed: Sequence[str]) -> None:
    """Validate a string flag, or each entry of a list flag, against ``allowed`` (for choices known
    only once the library is imported, e.g. registered attention backends)."""
    allowed = tuple(allowed)

    def check(value) -> bool:
        bad = [v for v in ([value] if isinstance(value, str) else value or []) if v not in allowed]
        if bad:
            raise flags.ValidationError(f"{', '.join(map(repr, bad))} is not one of "
                                        f"{', '.join(allowed)}.")
        return True

    flags.register_validator(holder, check)


def in_range(holder: flags.FlagHolder, low: float, high: float, *, include_high: bool = False) -> None:
    """Validate a float flag in the open interval (``low``, ``high``), or (``low``, ``high``] with
    ``include_high``."""
    flags.register_validator(holder, lambda v: low < v < high or (include_high and v == high),
                             f"must be in ({low:g}, {high:g}{']' if include_high else ')'}.")


def same_length(a: flags.FlagHolder, b: flags.FlagHolder) -> None:
    """Two list flags that pair up entry by entry (``--seq_lens`` with ``--windows``)."""
    def check(values) -> bool:
        if len(values[a.name]) != len(values[b.name]):
            raise flags.ValidationError(f"--{b.name} has {len(values[b.name])} entries, --{a.name} "
                                        f"{len(values[a.name])}: give one per entry.")
        return True

    flags.register_multi_flags_validator([a, b], check)


def flag_for_config_error(message: str) -> str:
    """``config.train: TrainConfig.remat='bogus' must be ...`` → ``flag --config.train.remat='bogus' must
    be ...``:
    the library names the config section and the dataclass field, the user typed the flag."""
    m = re.match(r"(config(?:\.\w+)*): \w+Config(?:\.|: )(\w+)=(.*)", message, re.S)
    if m:
        return f"flag --{m.group(1)}.{m.group(2)}={m.group(3)}"
    return f"flag --{message}" if message.startswith("config.") else message
