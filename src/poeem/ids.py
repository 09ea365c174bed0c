"""Item and query ids at the user-facing boundary.

Users speak their own ids: MovieLens movie ids, SKUs, user names. Models index dense rows
0..n-1. :class:`IdMap` translates in both directions and is saved with a run and with an
index directory, so search results come back in the user's ids. FAISS stores int64 ids and
returns -1 for "no result", so every id that reaches FAISS must be a non-negative integer:
:func:`check_ids` enforces that instead of truncating floats or accepting negatives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from poeem.errors import PoeemError

Ids = torch.Tensor | np.ndarray | list[int]


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
            f"dtype {array.dtype}" + (f", e.g. {array.ravel()[0].item()!r}" if array.size else ""),
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
        try:
            return int(text)
        except ValueError:
            raise PoeemError("id", "an integer id", repr(text), "pass the ids the data used") from None

    def rows(self, raw: Any, what: str = "ids") -> np.ndarray:
        """(n,) int64 dense rows of raw ids; unknown ids are a clear error."""
        values = np.asarray(raw).ravel().tolist()
        if self.is_integer and any(isinstance(v, float | str) for v in values):
            raise PoeemError(
                what,
                "integer ids",
                f"e.g. {next(v for v in values if not isinstance(v, int))!r}",
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
