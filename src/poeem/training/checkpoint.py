"""Checkpoints as one safetensors file: model weights, optimizer state and trainer state.

Loading never executes code (no pickle). Writing is atomic: a temporary file in the same
folder is renamed over the old checkpoint, so an interrupted save leaves the old one intact.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from poeem.errors import PoeemError
from poeem.storage import save_tensors
from poeem.training.optimizers import AnyOptimizer, move_state


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: AnyOptimizer | None,
    trainer_state: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save model, optimizer and trainer state (and ``extra`` tensors, stored under "extra.") to
    one safetensors file, atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})
    meta: dict[str, Any] = {"trainer": trainer_state}
    if optimizer is not None:
        optim_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(optim_tensors)
    save_tensors(path, tensors, metadata={"poeem": json.dumps(meta)})


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint, with a clear error for a missing or corrupt file."""
    if not path.is_file():
        raise PoeemError(
            "checkpoint",
            "an existing file",
            f"'{path}' (missing)",
            "check the run folder, or train without --resume",
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("poeem", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise PoeemError(
            "checkpoint", "a poeem safetensors checkpoint", f"'{path}' ({err})", "restore the file or retrain"
        ) from None
    return tensors, meta


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: AnyOptimizer | None = None,
    map_location: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Restore model (and optimizer) state in place; returns the trainer state."""
    tensors, meta = read_checkpoint(path)
    return restore_checkpoint(path, tensors, meta, model, optimizer, map_location)


def restore_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    model: nn.Module,
    optimizer: AnyOptimizer | None = None,
    map_location: torch.device | str = "cpu",
    earlier: Callable[[], AnyOptimizer] | None = None,
) -> dict[str, Any]:
    """:func:`load_checkpoint` from what :func:`read_checkpoint` returned (``path`` names it in
    errors); returns the trainer state. ``earlier`` builds the optimizer in an earlier layout of
    its groups: a state that does not fit ``optimizer`` is read into it and moved over."""
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(model_state)
    if optimizer is not None and "optimizer" in meta:
        optim = {k: v.to(map_location) for k, v in tensors.items() if k.startswith("optim.")}
        saved = _unflatten_optimizer(optim, meta["optimizer"])
        try:
            try:
                optimizer.load_state_dict(saved)
            except ValueError:
                if earlier is None:
                    raise
                layout = earlier()
                layout.load_state_dict(saved)
                move_state(layout, optimizer)
        except (ValueError, KeyError) as err:
            raise PoeemError(
                "checkpoint optimizer state",
                "the optimizer this run was trained with",
                f"'{path}' ({err})",
                "resume with the run's own --optimizer and --table-optimizer",
            ) from None
    return meta.get("trainer", {})
