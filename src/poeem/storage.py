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
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
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


def inside(folder: Path, name: object, what: str, fix: str) -> Path:
    """``folder / name`` for a name read from a file of ``folder`` (a list of shards, a header,
    a manifest), if it resolves inside ``folder``, links followed; else a clear error. A folder
    is copied and downloaded: no name saved in it may reach a file elsewhere.

    Raises:
        PoeemError: ``name`` is not a string, is empty or absolute, or leads out of ``folder``
            (``..``, a link) or to ``folder`` itself.
    """
    expected = f"the name of a file inside '{folder}'"
    if not isinstance(name, str) or not name or "\0" in name or Path(name).is_absolute():
        raise PoeemError(what, expected, repr(name)[:200], fix)
    path = Path(folder) / name
    root, target = Path(folder).resolve(), path.resolve()
    if target == root or not target.is_relative_to(root):
        raise PoeemError(what, expected, f"{name[:200]!r}, which leads to '{target}'", fix)
    return path


def tensor_specs(path: Path, what: str, fix: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The dtype (safetensors' name: "F32", "I64" ...) and shape of each tensor of a safetensors
    file, read from its header alone (checked against the file's size), or a clear error."""
    if not Path(path).is_file():
        raise PoeemError(what, f"an existing file '{path}'", "it is missing", fix)
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (not iterable)
            return {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise PoeemError(what, "a readable safetensors file", f"'{path}' ({err})", fix) from None


def read_tensors(path: Path, what: str, fix: str, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or a clear error naming ``what`` for a missing or corrupt one.

    With ``mmap`` the tensors are copy-on-write memory maps of the file: pages are read when
    rows are used, so a large feature table costs no memory until it is touched.
    """
    if not Path(path).is_file():
        raise PoeemError(what, f"an existing file '{path}'", "it is missing", fix)
    try:
        return _mapped_tensors(Path(path)) if mmap else load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, KeyError) as err:
        raise PoeemError(what, "a readable safetensors file", f"'{path}' ({err})", fix) from None


_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "U8": "u1"}


def _mapped_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Each tensor of a safetensors file as a copy-on-write numpy memory map (little-endian)."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, stop = info["data_offsets"]
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if stop - start != dtype.itemsize * int(np.prod(shape)):
            raise ValueError(f"tensor {name!r}: {stop - start} bytes for shape {shape}")
        if stop == start:  # numpy cannot map zero bytes
            out[name] = torch.from_numpy(np.zeros(shape, dtype))
            continue
        mapped = np.memmap(path, dtype=dtype, mode="c", offset=8 + header_len + start, shape=shape)
        out[name] = torch.from_numpy(mapped)
    return out


def read_json(path: Path, what: str, fix: str) -> Any:
    """The parsed JSON of a file, or a clear error naming ``what`` for a missing or corrupt one."""
    if not Path(path).is_file():
        raise PoeemError(what, f"an existing file '{path}'", "it is missing", fix)
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise PoeemError(what, "valid JSON", f"'{path}' ({err})", fix) from None
