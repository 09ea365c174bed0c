"""The index directory: a learned index saved for serving, updated safely by several processes.

::

    INDEX_DIR/manifest.json                 format, version, metric, layer config, files, sha256s
    INDEX_DIR/index-<v>.faiss               the FAISS index (FAISS's own format, no pickle)
    INDEX_DIR/codes-<v>.safetensors         the same index as tensors: rotation, centroids,
                                            codebooks, codes and FAISS ids (source of truth)
    INDEX_DIR/vectors-<v>.safetensors       optional: the base items' own vectors, row by row with
                                            the codes, to re-rank candidates (float32, float16 or
                                            SQ8, whose per-dimension range the manifest's
                                            ``rerank`` field records)
    INDEX_DIR/query_tower-<v>.safetensors   optional: the query tower, to search by query id
    INDEX_DIR/text_query-<v>.safetensors    optional: text query head (+ tuned encoder), to search by text
    INDEX_DIR/text_item-<v>.safetensors     optional: text document head (+ tuned encoder), to add by text
    INDEX_DIR/query_features-<v>.safetensors  optional: each query's numeric features
    INDEX_DIR/query_keys-<v>.json           optional: the raw id of each query-tower row
    INDEX_DIR/item_keys-<v>.json            optional: raw item ids when they are not integers
    INDEX_DIR/segment-<v>.safetensors       items added by version v: lists, codes, FAISS ids
                                            (and their vectors, for an index that keeps them)
    INDEX_DIR/segment_keys-<v>.json         their raw ids, for string ids
    INDEX_DIR/tombstones-<v>.safetensors    every FAISS id removed since the base (cumulative)
    INDEX_DIR/.lock                         taken by writers
    INDEX_DIR/writer.lock                   the export or distillation writing it (poeem.folder_lock)

The ``faiss`` and ``codes`` files are the base; the live index is the base plus the segments
minus the tombstones (see :mod:`poeem.search.segments`). An update takes the writer lock,
checks that the manifest on disk is still the version it started from (compare-and-swap: a
stale writer gets an error instead of dropping another writer's items), writes only the files
it changes for version v+1 (fsynced), atomically replaces the manifest, and deletes the files
that neither v nor v+1 names. Version v's files stay on disk, so a reader that has just read
manifest v can still open them; a reader that loses that race reloads.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss

from poeem._version import __version__
from poeem.errors import PoeemError
from poeem.export.item_vectors import VECTORS_ROLE, VectorCodec
from poeem.index.config import IndexSpec, PoeemConfig
from poeem.metric import METRICS
from poeem.storage import atomic_write, atomic_write_json, fsync_dir, inside, read_json, save_tensors
from poeem.user_files import require_folder

FORMAT = "poeem-index/1"
LOCK_NAME = ".lock"
REQUIRED_ROLES = ("faiss", "codes")
_VERSIONED = re.compile(r"^[a-z_]+-(\d+)\.(faiss|safetensors|json)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
REEXPORT = "re-export the index with 'poeem export', or restore the directory from a backup"
FIX_INDEX_DIR = "pass a folder written by 'poeem export'"


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
    query_tower: dict[str, Any] | None = None  # Tower.config() + "normalize"
    text_query: dict[str, Any] | None = None  # TextConfig fields + "dim", "normalize"
    text_item: dict[str, Any] | None = None  # the same, of the document side
    rerank: dict[str, Any] | None = None  # VectorCodec.to_manifest(): the stored vectors' precision
    poeem_version: str = __version__
    faiss_version: str = faiss.__version__
    format: str = FORMAT

    @property
    def spec(self) -> IndexSpec:
        """What the index is: its dimension, lists and codes (validated when the manifest was
        read; the layer's training settings are kept beside it, in ``layer``)."""
        return IndexSpec.of(self.layer)

    @classmethod
    def from_json(cls, raw: Any) -> Manifest:
        """A validated manifest; every malformed field is a clear :class:`PoeemError`."""

        def bad(what: str, expected: str, got: Any) -> PoeemError:
            return PoeemError(f"index manifest field '{what}'", expected, repr(got)[:80], REEXPORT)

        if not isinstance(raw, dict):
            raise bad("(top level)", "a JSON object", raw)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise bad("(keys)", f"keys among {sorted(known)}", unknown)
        if raw.get("format") != FORMAT:
            raise PoeemError("index format", FORMAT, repr(raw.get("format")), REEXPORT)
        for name in ("metric", "dim", "layer"):
            if name not in raw:
                raise bad(name, "a value", "missing")
        if raw["metric"] not in METRICS:
            raise bad("metric", "'ip', 'cosine' or 'l2'", raw["metric"])
        for name in ("dim", "version"):
            value = raw.get(name, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise bad(name, "a non-negative integer", value)
        files, digests = raw.get("files", {}), raw.get("sha256", {})
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise bad("files", "an object of role -> file name", files)
        for role in REQUIRED_ROLES:
            if role not in files:
                raise bad("files", f"an entry for '{role}'", sorted(files))
        if any("/" in name or name.startswith(".") for name in files.values()):
            raise bad("files", "plain file names inside the directory", files)
        if not isinstance(digests, dict) or not all(
            isinstance(v, str) and _SHA256.match(v) for v in digests.values()
        ):
            raise bad("sha256", "an object of file name -> 64 hex digits", digests)
        unchecked = sorted(set(files.values()) - set(digests))
        if unchecked:
            raise bad("sha256", "a digest for every file", f"none for {unchecked}")
        if not isinstance(raw["layer"], dict):
            raise bad("layer", "an object of PoeemConfig fields", raw["layer"])
        PoeemConfig.from_dict(raw["layer"])  # raises a clear error when invalid
        for name in ("query_tower", "text_query", "text_item"):
            if raw.get(name) is not None and not isinstance(raw[name], dict):
                raise bad(name, "an object or null", raw[name])
        if raw.get("rerank") is not None:
            VectorCodec.from_manifest(raw["rerank"], raw["dim"])  # raises a clear error when invalid
        if (raw.get("rerank") is not None) != (VECTORS_ROLE in files):
            raise bad("rerank", f"a precision exactly when files has '{VECTORS_ROLE}'", raw.get("rerank"))
        return cls(**raw)

    @property
    def vector_codec(self) -> VectorCodec | None:
        """How the items' vectors are stored, or None for an index without them."""
        return VectorCodec.from_manifest(self.rerank, self.dim) if self.rerank is not None else None


def read_manifest(directory: Path, verify: bool = True) -> Manifest:
    """Load and validate ``manifest.json``, and (with ``verify``) the files and their checksums."""
    path = require_folder(directory, "index directory", FIX_INDEX_DIR) / "manifest.json"
    if not path.is_file():
        raise PoeemError("index directory", f"'{path}'", "no manifest.json", FIX_INDEX_DIR)
    manifest = Manifest.from_json(read_json(path, "index manifest", REEXPORT))
    if verify:
        for name in manifest.files.values():
            file = inside(directory, name, "index manifest field 'files'", REEXPORT)
            if not file.is_file():
                raise MissingIndexFile(name)
            if sha256(file) != manifest.sha256[name]:
                raise PoeemError(
                    "index file checksum",
                    f"sha256 {manifest.sha256[name][:12]}... for '{name}'",
                    "a different checksum (the file is corrupt or was changed)",
                    "restore the file or re-export the index",
                )
    return manifest


class MissingIndexFile(PoeemError):
    """A file the manifest names is gone (e.g. deleted by a newer version's writer)."""

    def __init__(self, name: str) -> None:
        super().__init__("index directory", f"'{name}'", "it is missing", REEXPORT)


class StaleIndexError(PoeemError):
    """The directory moved on since this copy was loaded; the update was not applied."""


@contextmanager
def writer_lock(directory: Path, timeout_s: float = 60.0) -> Iterator[None]:
    """Hold the directory's exclusive writer lock (an advisory ``flock`` on ``.lock``)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / LOCK_NAME).open("a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PoeemError(
                        "index directory lock",
                        f"the writer lock of '{directory}' within {timeout_s:.0f}s",
                        "another process still holds it",
                        "wait for the other update to finish, then retry",
                    ) from None
                time.sleep(0.02)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def role_stem(role: str) -> str:
    """The file-name stem of a role: a segment's role ``segment:<v>`` is stored as
    ``segment-<v>.safetensors``."""
    return role.split(":")[0]


def _role_file(role: str, version: int, payload: Any) -> str:
    if isinstance(payload, faiss.Index):
        return f"index-{version}.faiss"  # the one FAISS role, "faiss"
    return f"{role_stem(role)}-{version}." + ("json" if role_stem(role).endswith("_keys") else "safetensors")


def _write_role(directory: Path, name: str, payload: Any) -> None:
    if name.endswith(".faiss"):
        atomic_write(directory / name, lambda tmp: faiss.write_index(payload, str(tmp)))
    elif name.endswith(".json"):
        atomic_write_json(directory / name, payload)
    else:
        save_tensors(directory / name, payload)


def check_publishable(directory: str | Path, replace: bool) -> None:
    """Raise now the error :func:`write_version` would raise after long work: ``directory``
    holds an index and ``replace`` was not asked for."""
    if not replace and (Path(directory) / "manifest.json").exists():
        raise _occupied(Path(directory))


def _occupied(directory: Path) -> PoeemError:
    return PoeemError(
        "index directory",
        "a new or empty folder",
        f"'{directory}' holds an index",
        "pass --replace to publish a new version there, or another --out",
    )


def write_version(
    directory: Path,
    base: Manifest | None,
    new: Manifest,
    payloads: dict[str, Any],
    replace: bool = False,
    drop: tuple[str, ...] = (),
) -> Manifest:
    """Publish a new version of the index directory (see the module docstring).

    Args:
        directory: the index directory.
        base: the manifest this update started from, or None to create the directory (an
            existing index there is then an error, unless ``replace``).
        new: the manifest to publish; its version, files and checksums are filled in here.
        payloads: the files this version writes, by role: ``{"faiss": faiss.Index}``,
            safetensors roles as ``{"codes": {name: tensor}}``, JSON roles (``*_keys``) as
            lists. A new index needs ``faiss`` and ``codes``.
        replace: publish a whole new index (a new export) as the next version of whatever the
            directory holds; nothing of the old version is kept.
        drop: roles of ``base`` that this version no longer has (e.g. merged segments).
            Roles of ``base`` neither rewritten nor dropped are kept.

    Returns:
        The published manifest.

    Raises:
        StaleIndexError: the manifest on disk is not ``base`` any more.
    """
    with writer_lock(directory):
        on_disk = read_manifest(directory, verify=False) if (directory / "manifest.json").exists() else None
        if replace:  # the next version of whatever is there
            base = on_disk
        if (on_disk is None) != (base is None) or (
            on_disk is not None and base is not None and on_disk.version != base.version
        ):
            if base is None:
                raise _occupied(directory)
            raise StaleIndexError(
                "index update",
                f"the version this copy loaded ({base.version})",
                f"version {on_disk.version if on_disk else 'none'} on disk (another writer updated it)",
                "reload the index (Searcher.load, or POST /reload) and apply the update again",
            )
        v = (base.version if base else 0) + 1
        files: dict[str, str] = {}
        for role, payload in payloads.items():
            files[role] = _role_file(role, v, payload)
            _write_role(directory, files[role], payload)
        for role, name in (base.files if base and not replace else {}).items():
            if role not in drop:
                files.setdefault(role, name)
        published = Manifest(
            **{
                **asdict(new),
                "version": v,
                "files": files,
                # kept files keep their digest: an update hashes only what it wrote
                "sha256": {
                    name: base.sha256[name]
                    if base and role not in payloads and name in base.sha256
                    else sha256(directory / name)
                    for role, name in files.items()
                },
                "poeem_version": __version__,
                "faiss_version": faiss.__version__,
            }
        )
        atomic_write_json(directory / "manifest.json", asdict(published))
        _delete_older(directory, keep=set(files.values()) | set(base.files.values() if base else ()))
    return published


def _delete_older(directory: Path, keep: set[str]) -> None:
    """Remove versioned files that neither the new nor the previous manifest names, and
    temporary files of crashed writers (safe: we hold the writer lock)."""
    for path in directory.iterdir():
        stale_tmp = path.name.startswith(".") and path.name.endswith(".tmp")
        if stale_tmp or (_VERSIONED.match(path.name) and path.name not in keep):
            path.unlink(missing_ok=True)
    fsync_dir(directory)
