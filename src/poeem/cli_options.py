"""Command-line parameters built from documented settings (:mod:`poeem.options`): a command
declares ``**settings`` and :func:`with_settings` gives it one flag per setting."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, Any

import typer

from poeem.options import Option, options


def given_settings(values: dict[str, Any], found: list[Option]) -> dict[str, dict[str, Any]]:
    """The settings given on the command line, by config section ({"train": {"lr": 0.1}}); a
    setting without a flag is never one of them, even where a flag shares its name."""
    given: dict[str, dict[str, Any]] = {}
    for o in found:
        value = values.get(o.param) if o.cli else None
        if value is None or (isinstance(value, list | tuple) and not value):
            continue
        given.setdefault(o.section, {})[o.name] = tuple(value) if isinstance(o.default, tuple) else value
    return given


def distill_options() -> list[Option]:
    """``poeem distill``'s settings: the distillation's, and the layer's shape for a new index."""
    from poeem.index import PoeemConfig
    from poeem.index.config import FITTED_CODEBOOK_SIZE
    from poeem.training.distill import DistillConfig

    shape = ("num_coarse", "num_subspaces", "codebook_size", "rotation", "quantizer")
    layer = [o for o in options(PoeemConfig, "layer", "Index") if o.name in shape]
    fitted_k = dataclasses.replace(
        next(o for o in layer if o.name == "codebook_size"),
        default=FITTED_CODEBOOK_SIZE,
        help="K of a new index: codewords per sub-vector, a power of two (8-bit codes are the most "
        "accurate fitted after training; 16: 4-bit fast scan).",
    )
    layer = [fitted_k if o.name == "codebook_size" else o for o in layer]
    return [*layer, *options(DistillConfig, "distill", "Distillation")]


def setting_parameter(o: Option) -> inspect.Parameter:
    """The command-line parameter of a documented setting."""
    decls = [f"{o.flag}/--no-{o.flag.removeprefix('--')}"] if o.value_type is bool else [o.flag]
    text = o.help + (f" One of: {' | '.join(o.choices)}." if o.choices else "")
    text += " Safe to change on --resume." if o.resume else ""
    shown = ", ".join(map(str, o.default)) if isinstance(o.default, tuple) else o.default
    known = shown not in (None, [], "") and o.default is not dataclasses.MISSING
    option = typer.Option(
        *decls, help=text, rich_help_panel=o.panel, show_default=str(shown) if known else False
    )
    annotation = Annotated[o.value_type | None, option]  # type: ignore[name-defined]
    return inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)


def with_settings(command: Any, found: list[Option]) -> Any:
    """``command`` with one keyword parameter per setting in place of its ``**settings``."""
    fixed = [
        p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD
    ]
    params = fixed + [setting_parameter(o) for o in found if o.cli]
    command.__signature__ = inspect.Signature(params, return_annotation=None)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command
