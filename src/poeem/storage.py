"""Durable file I/O that every layer of poeem may use: atomic writes, safetensors and JSON.

A write goes to a temporary file in the target's folder, is flushed and fsynced, gets the
usual permissions (0666 minus the umask, as ``open()`` would give), and is renamed over the
target; then the folder is fsynced so that the rename itself survives a crash. Readers see
the old file or the new one, never a half-written one. Loading never executes code: tensors
come from safetensors, metadata from JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from poeem.errors import PoeemError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink inside ``folder`` durable (no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    """Call ``write(tmp_path)``, then fsync the file and rename it to ``path`` (see module doc)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(value, indent=2))


def save_tensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically; tensors are moved to CPU and made contiguous."""
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def read_tensors(path: Path, what: str, fix: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or a clear error naming ``what`` for a missing or corrupt one."""
    if not Path(path).is_file():
        raise PoeemError(what, f"an existing file '{path}'", "it is missing", fix)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise PoeemError(what, "a readable safetensors file", f"'{path}' ({err})", fix) from None


def read_json(path: Path, what: str, fix: str) -> Any:
    """The parsed JSON of a file, or a clear error naming ``what`` for a missing or corrupt one."""
    if not Path(path).is_file():
        raise PoeemError(what, f"an existing file '{path}'", "it is missing", fix)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise PoeemError(what, "valid JSON", f"'{path}' ({err})", fix) from None
