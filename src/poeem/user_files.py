"""Files a user hands to the command line: existing paths, id lists and ``.npy`` arrays.

Each reader fails with one clear :class:`~poeem.errors.PoeemError` naming the file; the fix
it suggests is the caller's (the command knows its own options).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from poeem.errors import PoeemError
from poeem.ids import IdMap, check_ids

CHECK_PATH = "check the path"


def require_file(path: str | Path, what: str, fix: str = CHECK_PATH) -> Path:
    """The path, if it is an existing file; else a clear error."""
    path = Path(path)
    if not path.is_file():
        got = f"'{path}' (a folder)" if path.is_dir() else f"'{path}' (missing)"
        raise PoeemError(what, "an existing file", got, fix)
    return path


def require_folder(path: str | Path, what: str, fix: str = CHECK_PATH) -> Path:
    """The path, if it is an existing folder; else an error saying that it does not exist."""
    path = Path(path)
    if not path.is_dir():
        got = f"'{path}', which is a file" if path.exists() else f"'{path}', which does not exist"
        raise PoeemError(what, "an existing folder", got, fix)
    return path


def malformed(path: Path, line_no: int, expected: str, line: str) -> PoeemError:
    """The error for one bad line (1-based line number)."""
    shown = line.rstrip("\n")[:80]
    return PoeemError(f"{path}, line {line_no}", expected, repr(shown), "fix or remove that line")


def read_ids(path: Path, keys: IdMap | None, what: str = "ids file") -> np.ndarray:
    """The ids in a ``.npy`` array or a text file (one per line, first CSV field).

    Args:
        path: the file.
        keys: the id map the ids must belong to (typed like it), or None for integer ids.

    Returns:
        (n,) ids: int64 without a map or with an integer map, else the map's own type.
    """
    require_file(path, what)
    if path.suffix == ".npy":
        values = np.load(path, allow_pickle=False).ravel()
        return values if keys is not None and not keys.is_integer else check_ids(values, unique=False).numpy()
    out: list[Any] = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split(",")[0].strip()
        if not text:
            continue
        try:
            out.append(keys.parse(text) if keys is not None else int(text))
        except (ValueError, PoeemError):
            expected = "one id per line" + (" (an integer)" if keys is None or keys.is_integer else "")
            raise malformed(path, no, expected, line) from None
    return np.array(out, dtype=None if out else np.int64)


def read_array(path: Path, what: str) -> np.ndarray:
    """A numeric ``.npy`` array (loaded without pickle)."""
    require_file(path, what)
    if path.suffix != ".npy":
        raise PoeemError(
            what, "a .npy float array of shape (n, dim)", f"'{path.name}'", "save it with numpy.save"
        )
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:
        raise PoeemError(what, "a numeric .npy array", f"'{path}' ({err})", "re-save it") from None


def read_pairs(path: Path, what: str) -> dict[str, list[str]]:
    """(query, item) pairs, one per line, separated by a comma, tab or spaces (more fields are
    ignored, so a ratings file works as it is).

    Returns:
        Each query id's items, both as the text the file holds.
    """
    import re

    require_file(path, what)
    out: dict[str, list[str]] = {}
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = re.split(r"[,\t ]+", line.strip())
        if len(fields) < 2:
            raise malformed(path, no, "'query,item' on each line", line)
        out.setdefault(fields[0], []).append(fields[1])
    return out


def read_new_ids(path: Path, what: str = "ids file") -> np.ndarray:
    """Ids for a new index: a ``.npy`` array, or one per line (first CSV field); integers when
    every one is an integer, else strings.

    Returns:
        (n,) int64 or str ids.
    """
    if path.suffix == ".npy":
        return np.load(require_file(path, what), allow_pickle=False).ravel()
    texts = [line.split(",")[0].strip() for line in require_file(path, what).read_text().splitlines()]
    texts = [t for t in texts if t]
    try:
        return np.array([int(t) for t in texts], dtype=np.int64)
    except ValueError:
        return np.array(texts)
