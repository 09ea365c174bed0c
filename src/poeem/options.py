"""Settings declared once: a config dataclass field carries its help text, its command-line
flag and whether a resumed run may change it, as field metadata (:func:`setting`), and its
type and bounds, as its type hint (``int``, ``Literal[...]``, :data:`PositiveInt` ...).

``poeem train``'s flags, their ``--help``, the resume check and the option tables of the docs
are all built from these fields (:func:`options`, :func:`markdown_table`). Every config class
checks its values against the hints on construction (:func:`check_settings`), so a setting from
the command line, a config file or Python is refused before any data loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import numbers
import types
import typing
from collections.abc import Iterable
from dataclasses import MISSING, dataclass
from typing import Annotated, Any, Literal, get_args, get_origin

import numpy as np

from poeem.errors import PoeemError

MAX_SEED = (1 << 31) - 1  # FAISS's k-means takes a 32-bit seed
INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class Bounds:
    """Bounds of a numeric setting, carried by its type hint: ``Annotated[int, Bounds(ge=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, x: float) -> bool:
        """Whether ``x`` lies within the bounds."""
        return (
            (self.ge is None or x >= self.ge)
            and (self.gt is None or x > self.gt)
            and (self.le is None or x <= self.le)
            and (self.lt is None or x < self.lt)
        )

    def text(self) -> str:
        """The bounds in words: ">= 1", "from 0 to 10", "> 0 and < 1"."""
        if self.ge is not None and self.le is not None:
            return f"from {self.ge} to {self.le}"
        named = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{op} {v}" for op, v in named if v is not None)


PositiveInt = Annotated[int, Bounds(ge=1)]
Count = Annotated[int, Bounds(ge=0)]  # 0 allowed: steps, lists, epochs ...
Seed = Annotated[int, Bounds(ge=0, le=MAX_SEED)]
Positive = Annotated[float, Bounds(gt=0)]
NonNegative = Annotated[float, Bounds(ge=0)]


def setting(
    default: Any = MISSING,
    *,
    help: str,
    flag: str | None = None,
    resume: bool = False,
    cli: bool = True,
    default_factory: Any = MISSING,
) -> Any:
    """A config field with its documentation.

    Args:
        default, default_factory: as :func:`dataclasses.field`.
        help: one or two sentences for ``--help`` and the docs.
        flag: the command-line flag, when it is not ``--`` plus the field's name with dashes.
        resume: a resumed run may change it (it alters neither the model nor the batches seen).
        cli: a ``poeem train`` flag; otherwise the setting is set in ``--config`` only.
    """
    metadata = {"help": help, "flag": flag, "resume": resume, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass(frozen=True)
class Option:
    """One documented setting of a config section."""

    section: str  # where it goes in a RunConfig: "data", "model.poeem", "train", ...
    name: str  # the dataclass field
    flag: str  # e.g. "--data-path"
    value_type: type  # what the command line parses: int, float, str, bool, or list[int]/list[str]
    help: str
    panel: str  # the --help group
    resume: bool
    cli: bool
    default: Any
    choices: tuple[str, ...] = ()
    bounds: str = ""  # what a bounded setting accepts, e.g. "an integer >= 1"

    @property
    def param(self) -> str:
        """The Python name of the command-line parameter."""
        return self.flag.removeprefix("--").replace("-", "_")


def options(cls: type, section: str, panel: str) -> list[Option]:
    """The documented fields of the dataclass ``cls``, in declaration order."""
    hints, bounded = typing.get_type_hints(cls), _hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        value_type, choices = _command_line_type(hints[f.name])
        default = f.default
        if default is MISSING and f.default_factory is not MISSING:
            default = f.default_factory()
        found.append(
            Option(
                section=section,
                name=f.name,
                flag=f.metadata["flag"] or "--" + f.name.replace("_", "-"),
                value_type=value_type,
                help=f.metadata["help"],
                panel=panel,
                resume=f.metadata["resume"],
                cli=f.metadata["cli"],
                default=default,
                choices=choices,
                bounds=_bounds_text(bounded[f.name]),
            )
        )
    return found


def _bounds_text(hint: Any) -> str:
    """What a setting with bounds accepts ("an integer >= 1", "a list of integers >= 1"), or ""."""
    hint = _without_none(hint)
    if get_origin(hint) is Annotated:
        return _kind(hint)
    if get_origin(hint) in (tuple, list) and get_origin(get_args(hint)[0]) is Annotated:
        return f"a list of {_kind(get_args(hint)[0], plural=True)}"
    return ""


def _command_line_type(hint: Any) -> tuple[Any, tuple[str, ...]]:
    """(the type the command line parses, the allowed strings) of a field's type hint."""
    args = [a for a in get_args(hint) if a is not type(None)]
    if get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _command_line_type(args[0])
    if get_origin(hint) is Literal:
        return str, tuple(str(a) for a in get_args(hint))
    if get_origin(hint) in (tuple, list):
        return list[get_args(hint)[0]], ()  # type: ignore[misc,valid-type]
    return hint, ()


def markdown_table(found: list[Option]) -> str:
    """A markdown table of settings: name, default, what it does."""
    lines = ["| option | default | what it does |", "|---|---|---|"]
    for o in found:
        default = "(required)" if o.default is MISSING else f"`{o.default!r}`".replace("|", "\\|")
        text = o.help + (f" One of {', '.join(repr(c) for c in o.choices)}." if o.choices else "")
        text += f" {o.bounds[0].upper()}{o.bounds[1:]}." if o.bounds else ""
        text += "" if o.cli else " Config file only."
        lines.append(f"| `{o.name}` | {default} | {text} |")
    return "\n".join(lines) + "\n"


def one_of(names: Iterable[Any]) -> str:
    """'a', 'b' or 'c'."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


class _Mismatch(Exception):
    """A value that does not fit a type hint; ``expected`` says what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def check_settings(config: Any, section: str) -> None:
    """Check every field of the config dataclass ``config`` against its type hint, in place.

    What each hint accepts: ``int`` an integer (not a bool) of at most 64 bits; ``float`` a
    finite number (an int becomes a float); ``bool`` true or false; ``str`` a string;
    ``Literal[...]`` one of its strings; ``tuple[X, ...]`` and ``list[X]`` a list or tuple of X
    (made a tuple or list); ``dict`` a dict; a dataclass an instance of it; ``X | None`` also
    None; ``Annotated[int, Bounds(...)]`` (:data:`PositiveInt`, :data:`Seed` ...) the bounds too.

    Args:
        config: a dataclass instance (a config section), checked from its ``__post_init__``.
        section: where its settings go in a run config ("train", "model.poeem"), for messages.

    Raises:
        PoeemError: naming the first setting that does not fit, what it needs, and a fix.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = _hints(type(config))[f.name]
        try:
            setattr(config, f.name, _conform(value, hint))
        except _Mismatch as bad:
            what = f"{section}.{f.name}" if section else f.name
            raise PoeemError(
                what, bad.expected, _shown(value), _fix(what, f, value, hint, bad.expected)
            ) from None


def check_keys(given: dict[str, Any], cls: type, section: str) -> None:
    """Refuse keys of ``given`` that are not fields of the dataclass ``cls``, suggesting the
    closest field name.

    Args:
        given: the settings of one section, e.g. a config file's ``[model.poeem]`` table.
        cls: the config class they build.
        section: where they go in a run config ("model.poeem"); "" for its top level.
    """
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(key) for key in given if key not in known]
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        fix = f"did you mean '{close[0]}'?" if close else "remove it, or fix its spelling"
        what, kind = (f"[{section}]", "settings") if section else ("run config", "sections")
        raise PoeemError(what, f"{kind} among {', '.join(known)}", f"'{unknown[0]}'", fix)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The type hints of a dataclass, bounds included."""
    return typing.get_type_hints(cls, include_extras=True)


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` takes it (a list made a tuple, an int a float); raises _Mismatch."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin is Annotated:
        bounds = next((a for a in args[1:] if isinstance(a, Bounds)), Bounds())
        try:
            value = _conform(value, args[0])
            within = bounds.holds(value)
        except _Mismatch:
            within = False
        if not within:
            raise _Mismatch(_kind(hint))
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        expected = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _conform(value, arg)
            except _Mismatch as bad:
                expected.append(bad.expected)
        spelt = any("none" in get_args(a) for a in args if get_origin(a) is Literal)  # "none" is None
        raise _Mismatch(" or ".join(expected) + (" or None" if type(None) in args and not spelt else ""))
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise _Mismatch(one_of(args))
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise _Mismatch(f"a list of {_kind(args[0], plural=True)}")
        try:
            return origin(_conform(v, args[0]) for v in value)
        except _Mismatch as bad:
            raise _Mismatch(f"a list of {_kind(args[0], plural=True)}") from bad
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch("a table of settings (a dict)")
        return value
    if hint is bool:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        raise _Mismatch("true or false")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _Mismatch("an integer")
        if not INT64[0] <= value <= INT64[1]:
            raise _Mismatch("a 64-bit integer")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _Mismatch("a finite number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise _Mismatch("a finite number")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise _Mismatch("a string")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, hint):
            raise _Mismatch(f"a {hint.__name__}")
        return value
    return value


def _kind(hint: Any, plural: bool = False) -> str:
    """How messages name a hint's values: "an integer", "integers >= 1", "strings"."""
    if get_origin(hint) is Annotated:
        bounds = next((a for a in get_args(hint)[1:] if isinstance(a, Bounds)), Bounds())
        return f"{_kind(get_args(hint)[0], plural)} {bounds.text()}".rstrip()
    names = {
        int: ("an integer", "integers"),
        float: ("a finite number", "finite numbers"),
        str: ("a string", "strings"),
    }
    singular, many = names.get(hint, (str(hint), str(hint)))
    return many if plural else singular


def _shown(value: Any) -> str:
    """A value as a message shows it: tuples as lists, long ones cut, with its type where the
    text alone would mislead ('64' is a string, True a boolean)."""
    text = repr(list(value) if isinstance(value, tuple) else value)
    text = text if len(text) <= 80 else text[:77] + "..."
    if isinstance(value, str):
        return f"{text} (a string)"
    if isinstance(value, bool):
        return f"{text} (a boolean)"
    if value is None:
        return "None (null)"
    return text


def _fix(what: str, f: dataclasses.Field, value: Any, hint: Any, expected: str) -> str:
    """A fix that works for a value that does not fit: the value written as it was meant, the
    closest choice, or the default as an example."""
    name = what.rsplit(".", 1)[-1]
    flag = f" ({f.metadata['flag'] or '--' + name.replace('_', '-')})" if f.metadata.get("cli") else ""
    default = f.default_factory() if f.default_factory is not MISSING else f.default
    shown = _written(default)
    example = f", e.g. {shown}" if shown not in (None, "null", "[]") else ""
    core = _core(hint)
    if get_origin(core) is Literal and isinstance(value, str):
        close = difflib.get_close_matches(value, get_args(core), n=1)
        return f"did you mean {close[0]!r}?" if close else f"pick one of {one_of(get_args(core))}"
    if value is None:
        kept = f"the default {shown}" if default is not MISSING else "none: it is required"
        return f"give {what}{flag} a value (leaving it out keeps {kept})"
    if (
        get_origin(core) in (tuple, list)
        and not isinstance(value, list | tuple)
        and _fits(value, get_args(core)[0])
    ):
        return f"write a list: {name} = [{json.dumps(value)}]"
    if get_origin(core) is dict or core is dict:
        return f"write them as a [{what}] table in TOML, or an object in JSON"
    meant: Any = None
    if isinstance(value, str):
        meant = next((parse(value) for parse in (int, float) if _parses(parse, value)), None)
    elif isinstance(value, float) and value.is_integer():
        meant = int(value)
    if meant is not None and _fits(meant, hint):
        return f"write it as a number: {name} = {meant!r}"
    if expected.endswith(" or None"):
        return f"set {what}{flag} to {expected.removesuffix(' or None')}, or leave it out"
    return f"set {what}{flag} to {expected}{example}"


def _written(value: Any) -> str | None:
    """``value`` as a config file writes it (JSON, which TOML reads alike for numbers, strings
    and lists), or None for what a file cannot hold."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return None


def _without_none(hint: Any) -> Any:
    """``X | None`` -> X; other hints as they are."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else hint
    return hint


def _core(hint: Any) -> Any:
    """A hint without its None option and bounds: ``Annotated[int, ...] | None`` -> int."""
    hint = _without_none(hint)
    return get_args(hint)[0] if get_origin(hint) is Annotated else hint


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits ``hint``."""
    try:
        _conform(value, hint)
    except _Mismatch:
        return False
    return True


def _parses(parse: Any, text: str) -> bool:
    """Whether ``parse(text)`` works (int or float of a string)."""
    try:
        parse(text)
    except ValueError:
        return False
    return True
