"""A generic interactions table (CSV or Parquet) with configurable columns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from poeem.data.files import DATA_PATH_FIX, dense_ids
from poeem.data.interactions import InteractionData
from poeem.data.splits import Split, split_per_query
from poeem.errors import PoeemError
from poeem.user_files import malformed, require_file


def _read(path: Path, columns: list[str]) -> pd.DataFrame:
    parquet = path.suffix == ".parquet"
    if parquet:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
    else:
        names = pd.read_csv(path, nrows=0).columns.tolist()
    if any(c not in names for c in columns):
        raise PoeemError(
            f"{path}",
            f"a header with columns {columns}",
            f"header {names}",
            "pass the right --query-column/--item-column names",
        )
    if parquet:
        return pq.read_table(path, columns=columns).to_pandas()
    return pd.read_csv(path, usecols=columns, dtype=str, keep_default_na=False)


def _to_numeric(df: pd.DataFrame, col: str, path: Path) -> np.ndarray:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = np.flatnonzero(values.isna().to_numpy())
    if len(bad):
        line_no = int(bad[0]) + 2  # 1-based, after the header
        raise malformed(path, line_no, f"a number in column '{col}'", str(df[col].iloc[bad[0]]))
    return values.to_numpy()


def _per_id_features(dense: np.ndarray, n: int, values: np.ndarray) -> np.ndarray:
    """(n, F) features per dense id, taken from each id's last row."""
    out = np.zeros((n, values.shape[1]), dtype=np.float32)
    out[dense] = values
    return out


def load_table(
    path: str | Path,
    query_column: str = "user",
    item_column: str = "item",
    time_column: str | None = None,
    query_feature_columns: tuple[str, ...] = (),
    item_feature_columns: tuple[str, ...] = (),
    split: Split = "random",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> InteractionData:
    """Load interactions from a CSV (with header) or Parquet file.

    Query and item values may be any strings or numbers; they are mapped to dense ids. Numeric
    feature columns become per-id side features of the query or item tower.
    """
    path = require_file(path, "interactions table", DATA_PATH_FIX)
    columns = [
        query_column,
        item_column,
        *([time_column] if time_column else []),
        *query_feature_columns,
        *item_feature_columns,
    ]
    df = _read(path, list(dict.fromkeys(columns)))
    if df.empty:
        raise PoeemError(f"{path}", "at least one interaction row", "an empty table", "check the file")
    queries, query_keys = dense_ids(df[query_column].astype(str).to_numpy())
    items, item_keys = dense_ids(df[item_column].astype(str).to_numpy())
    nq, ni = int(queries.max()) + 1, int(items.max()) + 1
    times = _to_numeric(df, time_column, path) if time_column else np.zeros(len(df))
    how: Split = split if time_column else "random"
    train_q, train_i, test = split_per_query(queries, items, times, nq, how, test_fraction, seed)

    def features(cols: tuple[str, ...], dense: np.ndarray, n: int) -> np.ndarray | None:
        if not cols:
            return None
        values = np.stack([_to_numeric(df, c, path) for c in cols], 1).astype(np.float32)
        return _per_id_features(dense, n, values)

    return InteractionData(
        name=f"table:{path.name}",
        train_queries=train_q,
        train_items=train_i,
        num_queries=nq,
        num_items=ni,
        test=test,
        query_features=features(query_feature_columns, queries, nq),
        item_features=features(item_feature_columns, items, ni),
        query_keys=query_keys,
        item_keys=item_keys,
    )
