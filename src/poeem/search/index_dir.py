"""The index directory: a learned index saved for serving, updated atomically.

::

    INDEX_DIR/manifest.json             format, versions, metric, layer config, file names, sha256s
    INDEX_DIR/index-<v>.faiss           the FAISS index (FAISS's own format, no pickle)
    INDEX_DIR/codes-<v>.safetensors     the same index as tensors: rotation, centroids, codebooks,
                                        codes and item ids (the source of truth for updates)
    INDEX_DIR/query_tower.safetensors   optional: the query tower, to search by query id/features

Every update writes version v+1's files, then atomically replaces the manifest, then deletes
version v's files: an interrupted update leaves the previous index intact and loadable.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from poeem._version import __version__
from poeem.errors import PoeemError
from poeem.search.adc import IndexTensors
from poeem.training.checkpoint import atomic_write, atomic_write_text

FORMAT = "poeem-index/1"


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """What ``manifest.json`` records."""

    metric: str
    dim: int
    layer: dict[str, Any]  # PoeemConfig fields
    version: int = 0
    fast_scan: bool = False
    files: dict[str, str] = field(default_factory=dict)  # role -> file name
    sha256: dict[str, str] = field(default_factory=dict)  # file name -> digest
    query_tower: dict[str, Any] | None = None  # Tower arguments + "normalize"
    poeem_version: str = __version__
    faiss_version: str = faiss.__version__
    format: str = FORMAT


def tensors_to_dict(ix: IndexTensors) -> dict[str, torch.Tensor]:
    """Flat name -> tensor mapping for safetensors."""
    out = {
        "rotation": ix.rotation,
        "codebooks": ix.codebooks,
        "coarse_codes": ix.coarse_codes,
        "codes": ix.codes,
        "ids": ix.ids,
    }
    if ix.coarse is not None:
        out["coarse"] = ix.coarse
    return {k: v.contiguous() for k, v in out.items()}


def tensors_from_dict(d: dict[str, torch.Tensor]) -> IndexTensors:
    """Inverse of :func:`tensors_to_dict`."""
    return IndexTensors(
        rotation=d["rotation"],
        coarse=d.get("coarse"),
        codebooks=d["codebooks"],
        coarse_codes=d["coarse_codes"],
        codes=d["codes"],
        ids=d["ids"],
    )


def write_version(
    directory: Path,
    manifest: Manifest,
    index: faiss.Index,
    tensors: IndexTensors,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Manifest:
    """Write a new version of the index directory (see the module docstring for atomicity).

    Args:
        manifest: the current manifest (its version is incremented).
        extra: additional safetensors files by role, e.g. ``{"query_tower": state_dict}``.

    Returns:
        The new manifest.
    """
    directory.mkdir(parents=True, exist_ok=True)
    old_files = set(manifest.files.values())
    v = manifest.version + 1
    files = {"faiss": f"index-{v}.faiss", "codes": f"codes-{v}.safetensors"}
    atomic_write(directory / files["faiss"], lambda tmp: faiss.write_index(index, str(tmp)))
    atomic_write(directory / files["codes"], lambda tmp: save_file(tensors_to_dict(tensors), str(tmp)))
    kept = {role: name for role, name in manifest.files.items() if role not in files}
    for role, state in (extra or {}).items():
        kept[role] = f"{role}-{v}.safetensors"
        atomic_write(directory / kept[role], lambda tmp, s=state: save_file(s, str(tmp)))
    files.update(kept)
    new = Manifest(
        **{
            **manifest.__dict__,
            "version": v,
            "files": files,
            "sha256": {name: sha256(directory / name) for name in files.values()},
            "poeem_version": __version__,
            "faiss_version": faiss.__version__,
        }
    )
    atomic_write_text(directory / "manifest.json", json.dumps(new.__dict__, indent=2))
    for name in old_files - set(files.values()):
        (directory / name).unlink(missing_ok=True)
    return new


def read_manifest(directory: Path) -> Manifest:
    """Load and validate ``manifest.json`` and the checksums of the files it names."""
    path = directory / "manifest.json"
    if not path.is_file():
        raise PoeemError(
            "index directory", f"'{path}'", "no manifest.json", "pass a folder written by 'poeem export'"
        )
    try:
        raw = json.loads(path.read_text())
        manifest = Manifest(**raw)
    except (json.JSONDecodeError, TypeError) as err:
        raise PoeemError(
            "index manifest", "a poeem manifest.json", f"unreadable ({err})", "re-export the index"
        ) from None
    if manifest.format != FORMAT:
        raise PoeemError("index format", FORMAT, manifest.format, "re-export with this poeem version")
    for name, digest in manifest.sha256.items():
        file = directory / name
        if not file.is_file():
            raise PoeemError("index directory", f"'{name}'", "it is missing", "re-export the index")
        if sha256(file) != digest:
            raise PoeemError(
                "index file checksum",
                f"sha256 {digest[:12]}... for '{name}'",
                "a different checksum (the file is corrupt or was changed)",
                "restore the file or re-export the index",
            )
    return manifest


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a clear error when unreadable."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise PoeemError(
            "index file", "a readable safetensors file", f"'{path}' ({err})", "re-export the index"
        ) from None
