"""Reading delimited files with errors that name the file, the line and what was expected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from poeem.errors import PoeemError
from poeem.ids import IdMap
from poeem.user_files import malformed

DATA_PATH_FIX = "check the path given as --data-path (DataConfig.path)"


def _first_bad_line(
    path: Path, sep: str, ncols: int, numeric: list[int], header: bool, encoding: str
) -> tuple[int, str] | None:
    with path.open(encoding=encoding, errors="replace") as f:
        for no, line in enumerate(f, 1):
            if (header and no == 1) or not line.strip():
                continue
            parts = line.rstrip("\r\n").split(sep)
            if len(parts) != ncols:
                return no, line
            try:
                for c in numeric:
                    float(parts[c])
            except ValueError:
                return no, line
    return None


def read_numeric_table(
    path: Path,
    sep: str,
    names: list[str],
    header: bool,
    expected: str,
    encoding: str = "utf-8",
) -> pd.DataFrame:
    """Read a delimited file whose columns are all numeric, fast, with line-numbered errors.

    Args:
        path: the file.
        sep: the field separator (may be several characters, e.g. '::').
        names: column names, one per field.
        header: whether the first line is a header to skip.
        expected: what one line should look like, for error messages.

    Returns:
        A DataFrame with float64 or int64 columns ``names``.
    """
    try:
        engine = "c" if len(sep) == 1 else "python"
        df = pd.read_csv(
            path,
            sep=sep,
            names=names,
            header=0 if header else None,
            engine=engine,
            encoding=encoding,
            skip_blank_lines=True,
        )
        bad_type = [c for c in names if not pd.api.types.is_numeric_dtype(df[c])]
        if bad_type or df.isna().any().any():
            raise ValueError("non-numeric field")
        return df
    except (ValueError, pd.errors.ParserError) as err:
        found = _first_bad_line(path, sep, len(names), list(range(len(names))), header, encoding)
        if found is None:
            raise PoeemError(
                str(path),
                expected,
                f"a file pandas cannot parse ({err})",
                "check the separator and the encoding",
            ) from None
        raise malformed(path, found[0], expected, found[1]) from None


def dense_ids(raw: np.ndarray) -> tuple[np.ndarray, IdMap]:
    """Map arbitrary ids to 0..n-1.

    Integer ids stay integers (also when read as text, like "0042" -> 42, unless that would
    merge two ids); anything else is kept as strings.

    Returns:
        dense: (len(raw),) int64 dense ids; the :class:`IdMap` back to the original ids.
    """
    raw = np.asarray(raw)
    if raw.dtype.kind in "fc":
        if not np.all(np.isfinite(raw)) or np.any(raw != np.round(raw)):
            raise PoeemError("ids", "integer or string ids", "fractional numbers", "fix the id column")
        raw = raw.astype(np.int64)
    if raw.dtype.kind in "UO":
        as_int = pd.to_numeric(pd.Series(raw), errors="coerce")
        if not as_int.isna().any() and (as_int == as_int.round()).all():
            ints = as_int.to_numpy().astype(np.int64)
            if len(np.unique(ints)) == len(np.unique(raw)):
                raw = ints
    originals, dense = np.unique(raw, return_inverse=True)
    return dense.astype(np.int64), IdMap(originals)
