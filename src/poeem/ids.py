"""Item and query ids at the user-facing boundary.

Users speak their own ids: MovieLens movie ids, SKUs, user names. Models index dense rows
0..n-1. :class:`IdMap` translates in both directions and is saved with a run and with an
index directory, so search results come back in the user's ids. FAISS stores int64 ids and
returns -1 for "no result", so every id that reaches FAISS must be a non-negative integer:
:func:`check_ids` enforces that instead of truncating floats or accepting negatives.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from poeem.errors import PoeemError

Ids = torch.Tensor | np.ndarray | list[int]


def integer_text(text: str) -> bool:
    """Whether ``text`` spells a whole number in ASCII digits, e.g. "12" or "-3" (not "²" or
    "١٢", which ``str.isdigit`` or ``int`` would accept)."""
    digits = text[1:] if text.startswith("-") else text
    return digits.isascii() and digits.isdigit()


def raw_id_array(values: list[Any]) -> np.ndarray:
    """(n,) raw ids from JSON values: int64 or str when all share a type, else objects (so that
    a string among integers is not turned into its neighbours' type, or they into strings)."""
    kinds = {type(v) for v in values}
    return np.array(values, dtype=object) if len(kinds) > 1 else np.array(values)


def _not_integer(values: list[Any]) -> Any:
    """The first value that is not an integer id (the one an error should quote)."""
    for v in values:
        if (
            isinstance(v, bool)
            or not isinstance(v, int | np.integer | str)
            or (isinstance(v, str) and not integer_text(v))
        ):
            return v
    return values[0]


def check_ids(ids: Ids | None, n: int | None = None, what: str = "ids", unique: bool = True) -> torch.Tensor:
    """Validated (n,) int64 ids: integers (no floats), non-negative, unique; 0..n-1 for None.

    Args:
        ids: integer ids, or None for 0..n-1.
        n: the number of ids expected, or None for any number.
        what: how error messages name the ids.
        unique: whether duplicates are an error.
    """
    if ids is None:
        if n is None:
            raise PoeemError(what, "ids", "None", "pass the ids")
        return torch.arange(n)
    array = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    if array.dtype == object and all(isinstance(v, int | np.integer) for v in array.ravel()):
        huge = [v for v in array.ravel() if not -(2**63) <= v < 2**63]
        if huge:
            raise PoeemError(
                what, "64-bit integer ids", f"{len(huge)} out of range, e.g. {huge[0]}", "pass smaller ids"
            )
        array = array.astype(np.int64)
    if array.dtype.kind not in "iu" or (array.dtype == np.uint64 and array.size and array.max() > 2**63 - 1):
        raise PoeemError(
            what,
            "64-bit integer ids",
            f"dtype {array.dtype}"
            + (f", e.g. {_not_integer(array.ravel().tolist())!r}" if array.size else ""),
            "pass whole-number ids (floats are not truncated, to avoid silent collisions)",
        )
    out = torch.from_numpy(np.ascontiguousarray(array.astype(np.int64).ravel()))
    if n is not None and out.numel() != n:
        raise PoeemError(what, f"one id per item ({n})", f"{out.numel()} ids", "pass one id per item")
    if out.numel() and int(out.min()) < 0:
        raise PoeemError(
            what,
            "non-negative ids",
            f"{int((out < 0).sum())} negative ids, e.g. {int(out.min())}",
            "use ids >= 0; -1 means 'no result' in FAISS",
        )
    if unique and out.unique().numel() != out.numel():
        raise PoeemError(
            what, "unique ids", f"{out.numel() - out.unique().numel()} duplicates", "deduplicate"
        )
    return out


def check_raw_ids(ids: Any, n: int, what: str = "ids") -> None:
    """Validate the items' own (n,) ids: unique non-negative integers, or unique non-empty strings."""
    array = np.asarray(ids)
    if array.dtype.kind in "UO" and not all(isinstance(v, int | np.integer) for v in array.ravel()):
        if array.size != n:
            raise PoeemError(what, f"one id per item ({n})", f"{array.size} ids", "pass one id per item")
        IdMap(array.ravel())
    else:
        check_ids(ids, n, what)


def known_rows(ids: Any, keys: IdMap | None, count: int, kind: Literal["query", "item"]) -> torch.Tensor:
    """(n,) int64 rows of ``ids``, the user's own: looked up in ``keys``, or, without keys, the ids
    themselves, which must lie in [0, count). Unknown ids are an error naming the ``kind``."""
    what = f"{kind} ids"
    if keys is not None:
        return torch.from_numpy(keys.rows(ids, what))
    rows = check_ids(ids, what=what, unique=False)
    if rows.numel() and int(rows.max()) >= count:
        plural = {"query": "queries", "item": "items"}[kind]
        raise PoeemError(
            what,
            f"ids in [0, {count})",
            f"max {int(rows.max())}",
            f"pass ids of {plural} the model was trained on",
        )
    return rows


class IdMap:
    """Raw ids (integers or strings) of n rows <-> dense rows 0..n-1.

    Args:
        keys: (n,) the raw id of each dense row, unique; integers or strings.
    """

    def __init__(self, keys: np.ndarray | list[Any]) -> None:
        keys = np.asarray(keys)
        if keys.dtype.kind in "iu":
            keys = keys.astype(np.int64)
        elif keys.dtype.kind in "UO":
            keys = keys.astype(str)
            if (keys == "").any():  # "" means "no result" in string search results
                raise PoeemError(
                    "ids",
                    "non-empty string ids",
                    f"{int((keys == '').sum())} empty ids",
                    "give every item an id",
                )
        else:
            raise PoeemError("id map", "integer or string ids", f"dtype {keys.dtype}", "pass raw ids")
        self.keys = keys
        self._row = {k: i for i, k in enumerate(keys.tolist())}
        if len(self._row) != len(keys):
            raise PoeemError("id map", "unique raw ids", f"{len(keys) - len(self._row)} duplicates", "dedupe")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def is_integer(self) -> bool:
        """Whether the raw ids are integers (else strings)."""
        return self.keys.dtype.kind == "i"

    def parse(self, text: str) -> int | str:
        """A raw id read from text, typed like this map's keys."""
        text = text.strip()
        if not self.is_integer:
            return text
        if not integer_text(text):
            raise PoeemError("id", "an integer id", repr(text), "pass the ids the data used")
        return int(text)

    def rows(self, raw: Any, what: str = "ids") -> np.ndarray:
        """(n,) int64 dense rows of raw ids; unknown ids are a clear error."""
        values = np.asarray(raw).ravel().tolist()
        if self.is_integer and any(isinstance(v, float | str) for v in values):
            raise PoeemError(
                what,
                "integer ids",
                f"e.g. {_not_integer(values)!r}",
                "pass the ids the data used",
            )
        out = self.lookup(values)
        if (out < 0).any():
            unknown = [values[i] for i in np.flatnonzero(out < 0)[:5]]
            raise PoeemError(
                what,
                "ids the model was trained on",
                f"unknown ids {unknown}",
                "check the ids (they are the data's original ids)",
            )
        return out

    def lookup(self, raw: Any) -> np.ndarray:
        """(n,) int64 dense rows of raw ids, -1 for an id this map does not know."""
        values = np.asarray(raw).ravel().tolist()
        if self.is_integer:
            return np.fromiter((self._row.get(v, -1) if isinstance(v, int) else -1 for v in values), np.int64)
        return np.fromiter((self._row.get(str(v), -1) for v in values), np.int64, len(values))

    def extend(self, raw: Any, n: int) -> tuple[IdMap, np.ndarray]:
        """A map that also knows the new raw ids, and the (n,) rows of all of ``raw``.

        Known ids keep their row; unknown ones get rows after the existing ones."""
        if self.is_integer:
            values = check_ids(raw, n).tolist()
            fresh = [v for v in values if v not in self._row]
            grown = IdMap(np.array(self.keys.tolist() + fresh, dtype=np.int64)) if fresh else self
            return grown, grown.rows(values)
        values = np.asarray(raw).ravel()
        if len(values) != n:
            raise PoeemError("ids", f"one id per item ({n})", f"{len(values)} ids", "pass one id per item")
        values = values.astype(str).tolist()
        if len(set(values)) != len(values):
            raise PoeemError(
                "ids", "unique ids", f"{len(values) - len(set(values))} duplicates", "deduplicate"
            )
        fresh = [v for v in values if v not in self._row]
        # as objects: numpy's fixed-width strings would cut longer new ids short
        grown = IdMap(np.array(self.keys.tolist() + fresh, dtype=object)) if fresh else self
        return grown, grown.rows(values)

    def raw(self, rows: np.ndarray) -> np.ndarray:
        """Raw ids of dense rows (same shape); a row of -1 ("no result") stays -1 (or '')."""
        rows = np.asarray(rows)
        valid = rows >= 0
        out = self.keys[np.where(valid, rows, 0)]
        if self.is_integer:
            return np.where(valid, out, -1)
        return np.where(valid, out, "")

    def to_json(self) -> list[Any]:
        """A JSON list of the raw ids, row order."""
        return self.keys.tolist()

    @classmethod
    def from_json(cls, value: Any, what: str) -> IdMap:
        """Inverse of :meth:`to_json`, with a clear error for a malformed list."""
        ok = isinstance(value, list) and (
            all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or all(isinstance(v, str) for v in value)
        )
        if not ok:
            raise PoeemError(what, "a list of integer or string ids", type(value).__name__, "re-export")
        return cls(np.array(value, dtype=np.int64 if value and isinstance(value[0], int) else str))
