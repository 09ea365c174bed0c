"""Settings declared once: a config dataclass field carries its help text, its command-line
flag and whether a resumed run may change it, as field metadata (:func:`setting`).

``poeem train``'s flags, their ``--help``, the resume check and the option tables of the docs
are all built from these fields (:func:`options`, :func:`markdown_table`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Literal, get_args, get_origin


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

    @property
    def param(self) -> str:
        """The Python name of the command-line parameter."""
        return self.flag.removeprefix("--").replace("-", "_")


def options(cls: type, section: str, panel: str) -> list[Option]:
    """The documented fields of the dataclass ``cls``, in declaration order."""
    hints = typing.get_type_hints(cls)
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
            )
        )
    return found


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
        text += "" if o.cli else " Config file only."
        lines.append(f"| `{o.name}` | {default} | {text} |")
    return "\n".join(lines) + "\n"
