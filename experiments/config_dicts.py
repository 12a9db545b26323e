"""Command-line configs generated from config dataclasses, and built back into them.

Frozen dataclasses are the single source of truth for a config option: the field, its default, its
check in ``__post_init__`` and its help, the string literal under the field (an attribute docstring;
a trailing ``# comment`` on the field's line also counts). This module turns them into
``ml_collections`` ConfigDicts, which absl's ``--config`` flags read with ``--config.a.b=VALUE``
overrides, and turns those back into the dataclasses:

- :func:`section` / :func:`overrides_section`: a dataclass instance as a ConfigDict (fields and
  values), or a dataclass's fields as unset overrides of a preset's values.
- :func:`from_dict` / :func:`apply_overrides`: back to the dataclass, each value converted to its
  field's type. A validation error that names a field and its value (``TrainConfig.steps=-1 must be
  >= 1.``) comes back naming the config path (``config.train.steps=-1 must be >= 1.``); any other
  error gets the section in front (``config.lora: LoRAConfig.targets has unknown projections ...``).
- Tuple-valued fields take overrides as lists: ``--config.lemo.profile="[1.0, 0.5]"``,
  ``--config.lora.targets=q,v``, ``[q, v]`` or repeated ``--config.lora.targets=q
  --config.lora.targets=v`` (:func:`parse_list`, registered with ml_collections on import).
- :func:`describe` lists a ConfigDict's fields with their values and help (``--config_help``);
  :class:`ConfigFlags` is a benchmark's ``--config`` / ``--config_help`` pair.

How the experiments lay their configs out (``config.model``, ``config.subllm``, ``config.lemo``, ...)
and build the pipelines' run configs from them is :mod:`experiments.run_configs`.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable
from typing import Any

from absl import flags
from ml_collections import config_dict
from ml_collections.config_flags import config_flags, tuple_parser

from experiments import _checks

# ----------------------------------------------------------------------------- help from the source

def field_docs(cls) -> dict[str, str]:
    """Each field's help: the string literal right under it, else a ``#`` comment on its line."""
    return _source_docs(cls)


@functools.cache
def _source_docs(cls) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
        elif node.end_lineno in comments:
            docs[node.target.id] = comments[node.end_lineno]
    return docs


# ----------------------------------------------------------------------------- types


@functools.cache
def field_types(cls) -> dict[str, Any]:
    """The resolved annotation of each field of dataclass ``cls``."""
    return typing.get_type_hints(cls)


def _members(typ) -> tuple:
    """The alternatives of a union type (the type itself otherwise)."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        return typing.get_args(typ)
    return (typ,)


def dataclass_types(typ) -> tuple:
    """The dataclasses among the alternatives of annotation ``typ`` (a nested section's types)."""
    return tuple(m for m in _members(typ) if dataclasses.is_dataclass(m))


def _is_tuple(typ) -> bool:
    return typing.get_origin(typ) is tuple


def _scalar(typ) -> type:
    """The Python type a scalar annotation stores (Literal[...] of strings: str)."""
    if typing.get_origin(typ) is typing.Literal:
        return type(typing.get_args(typ)[0])
    return typ


def _convert(value, typ, where: str):
    """``value`` (from a ConfigDict or JSON) as the annotation ``typ`` wants it."""
    members = _members(typ)
    if len(members) > 1:
        if value is None and type(None) in members:
            return None
        for member in members:
            if member is type(None):
                continue
            if dataclasses.is_dataclass(member):
                if isinstance(value, member):
                    return value
            elif _is_tuple(member):
                if isinstance(value, tuple | list):
                    converted = _convert(value, member, where)
                    return None if not converted and type(None) in members else converted
            else:
                try:
                    return _convert(value, member, where)
                except ValueError:
                    continue
        raise ValueError(f"{where}={value!r} is not a {typ}.")
    if _is_tuple(typ):
        if isinstance(value, str) or not isinstance(value, tuple | list):
            raise ValueError(f"{where}={value!r} must be a list, e.g. [a, b].")
        element = typing.get_args(typ)[0]
        return tuple(_convert(v, element, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(typ):
        if isinstance(value, typ):
            return value
        if isinstance(value, dict):
            return from_dict(typ, value, where)
        raise ValueError(f"{where}={value!r} must be a {typ.__name__} section.")
    kind = _scalar(typ)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{where}={value!r} must be True or False.")
    if kind in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError(f"{where}={value!r} must be a number.")
        try:
            number = kind(value) if not isinstance(value, str) else kind(value.strip())
        except ValueError:
            raise ValueError(f"{where}={value!r} is not a {kind.__name__}.") from None
        if kind is int and isinstance(value, float) and number != value:
            raise ValueError(f"{where}={value!r} is not an integer.")
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where}={value!r} must be a string.")
    return value


# ----------------------------------------------------------------------------- errors


def config_path_message(message: str, cls, where: str, aliases: dict[str, str] | None = None) -> str:
    """A validation error of ``cls`` built at config path ``where``, in terms of that path: a message
    that starts by naming a field and its value (``Cls.a.b=...``) names ``where.a.b`` instead (and
    every other ``Cls.`` in it likewise); any other message gets ``where: `` in front. ``aliases``
    maps dataclass field paths to the config paths that set them."""
    name = cls.__name__
    if not re.match(rf"{name}\.[\w.]+=", message):
        return f"{where}: {message}"
    return with_aliases(message.replace(f"{name}.", f"{where}."), where, aliases)


def with_aliases(message: str, where: str, aliases: dict[str, str] | None) -> str:
    """``message`` with each ``where.field`` of ``aliases`` renamed to the config path that sets it."""
    for field, path in (aliases or {}).items():
        message = re.sub(rf"{re.escape(where)}\.{field}\b", f"{where}.{path}", message)
    return message


def _construct(cls, values: dict, where: str, aliases=None):
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise ValueError(config_path_message(str(e), cls, where, aliases)) from None


# ----------------------------------------------------------------------------- dataclass <-> dict


def _entry(value, typ):
    if dataclasses.is_dataclass(value):
        return section(value)
    if value is None:
        kinds = [m for m in _members(typ) if m is not type(None)]
        return config_dict.placeholder(tuple if _is_tuple(kinds[0]) else _scalar(kinds[0]))
    if isinstance(value, tuple | list):
        return tuple(value)
    kinds = [_scalar(m) for m in _members(typ) if not _is_tuple(m)]
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # so that an override of a float field may have a fraction
    return value


def section(instance, *, exclude: tuple[str, ...] = ()) -> config_dict.ConfigDict:
    """The fields of a dataclass instance as a ConfigDict (nested dataclasses as nested sections,
    tuples as tuples, None as an unset placeholder of the field's type)."""
    hints = field_types(type(instance))
    c = config_dict.ConfigDict()
    for f in dataclasses.fields(instance):
        if f.name not in exclude:
            c[f.name] = _entry(getattr(instance, f.name), hints[f.name])
    return c


def overrides_section(cls, **values: Any) -> config_dict.ConfigDict:
    """Every field of ``cls`` as an unset override (None: keep the preset's), ``values`` set."""
    hints = field_types(cls)
    c = config_dict.ConfigDict()
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            c[f.name] = overrides_section(typ)
        else:
            c[f.name] = config_dict.placeholder(tuple if _is_tuple(typ) else _scalar(typ))
    for name, value in values.items():
        if name not in c:
            raise ValueError(f"{cls.__name__} has no field {name!r}.")
        c[name] = value
    return c


def from_dict(cls, values: dict, where: str, *, base=None, aliases: dict[str, str] | None = None):
    """``cls`` from a (ConfigDict's) dict: unknown keys are refused, values converted to the fields'
    types, missing ones taken from ``base`` (else the defaults); errors name config paths."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; {cls.__name__} has {sorted(names)}.")
    hints = field_types(cls)
    out = {} if base is None else {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for name, value in values.items():
        out[name] = _convert(value, hints[name], f"{where}.{name}")
    return _construct(cls, out, where, aliases)


def apply_overrides(instance, overrides: dict, where: str):
    """``instance`` with the fields ``overrides`` sets (None: unset) replaced, nested sections too."""
    cls = type(instance)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; {cls.__name__} has {sorted(names)}.")
    hints, changes = field_types(cls), {}
    for name, value in overrides.items():
        if value is None:
            continue
        if dataclasses.is_dataclass(hints[name]) and isinstance(value, dict):
            if any(v is not None for v in value.values()):
                changes[name] = apply_overrides(getattr(instance, name), value, f"{where}.{name}")
        else:
            changes[name] = _convert(value, hints[name], f"{where}.{name}")
    try:
        return dataclasses.replace(instance, **changes)
    except (ValueError, TypeError) as e:
        raise ValueError(config_path_message(str(e), cls, where)) from None


# ----------------------------------------------------------------------------- list overrides


def parse_list(text: str) -> tuple:
    """A command-line list: ``[1.0, 0.5]``, ``(1, 2)``, ``['q', 'v']``, ``[q, v]``, ``q,v`` or ``q``;
    empty (or ``[]``) is the empty list."""
    text = text.strip()
    if text in ("", "[]", "()"):
        return ()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        inner = text[1:-1] if text[0] + text[-1] in ("[]", "()") else text
        return tuple(part.strip().strip("'\"") for part in inner.split(",") if part.strip())
    return tuple(value) if isinstance(value, tuple | list) else (value,)


class ListParser(tuple_parser.TupleParser):
    """ml_collections' parser for tuple fields, accepting :func:`parse_list`'s forms as well."""

    def parse(self, argument):
        if isinstance(argument, str):
            return parse_list(argument)
        return super().parse(argument)


config_flags.register_flag_parser_for_type(tuple, ListParser())


# ----------------------------------------------------------------------------- help


def leaves(c, prefix: str = ""):
    """``(path, value)`` of every field of a (nested) ConfigDict, sections in key order."""
    for key in c:  # (sorted)
        value = c[key]
        path = f"{prefix}{key}"
        if isinstance(value, config_dict.ConfigDict):
            yield from leaves(value, path + ".")
        else:
            yield path, value


def _show(value) -> str:
    if isinstance(value, tuple | list):
        return "[" + ", ".join(repr(v) for v in value) + "]"
    return "unset" if value is None else repr(value)


def describe(c, help_for: Callable[[str], str]) -> str:
    """Every field of ``c``: ``--config.PATH=VALUE`` (its value now, after the config file and the
    overrides given) and ``help_for(PATH)``."""
    lines = []
    for path, value in leaves(c):
        lines.append(f"--config.{path}={_show(value)}")
        lines.extend(textwrap.wrap(help_for(path) or "(undocumented)", 100, initial_indent="    ",
                                   subsequent_indent="    "))
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ConfigFlags:
    """A benchmark's ``--config`` (overridable as ``--config.PATH=VALUE``) and ``--config_help``."""

    config: flags.FlagHolder
    help: flags.FlagHolder
    help_for: Callable[[str], str]
    what: str

    @property
    def value(self) -> config_dict.ConfigDict:
        return self.config.value

    def exit_if_help(self) -> None:
        """With ``--config_help``: print what the config is for and every field, and exit 0."""
        if self.help.value:
            print("\n".join(textwrap.wrap(self.what, 100)) + "\n")
            print(describe(self.config.value, self.help_for))
            sys.exit(0)


def define_config_flags(sections: config_dict.ConfigDict, help_for: Callable[[str], str],
                        what: str) -> ConfigFlags:
    """``--config`` holding ``sections`` and ``--config_help``; ``help_for(path)`` is a field's help
    and ``what`` says what the program does with the config."""
    with _checks.config_overrides_checked():  # overrides apply here: a missing field fails in one line
        config = config_flags.DEFINE_config_dict(
            "config", sections, f"{what} Override any field with --config.PATH=VALUE (lists: "
            "--config.a.b='[x, y]' or x,y); --config_help lists them.")
    config_help = flags.DEFINE_bool("config_help", False, "Print every --config field with its value "
                                    "and meaning, then exit.")
    return ConfigFlags(config, config_help, help_for, what)


def define_lemo_flags(description: str):
    """``--config.lemo.*`` flags for a :class:`~tokensparse.config.LeMoConfig` alone (the LeMo
    benchmarks' options), each with its field's docstring as help; ``.value.lemo`` holds them."""
    from tokensparse.config import LeMoConfig

    return define_config_flags(
        config_dict.ConfigDict({"lemo": section(LeMoConfig())}),
        lambda path: field_docs(LeMoConfig).get(path.removeprefix("lemo."), ""), description)

