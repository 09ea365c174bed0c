"""MovieLens ratings: ``u.data`` (100K), ``ratings.dat`` (1M/10M), ``ratings.csv`` (20M/25M/latest)."""

from __future__ import annotations

from pathlib import Path

from poeem.data.files import DATA_PATH_FIX, dense_ids, read_numeric_table
from poeem.data.interactions import InteractionData
from poeem.data.splits import Split, split_per_query
from poeem.errors import PoeemError
from poeem.user_files import require_file

COLUMNS = ["user", "item", "rating", "time"]
FORMATS = {  # file name -> (separator, header, what a line looks like)
    "u.data": ("\t", False, "'user<TAB>item<TAB>rating<TAB>timestamp'"),
    "ratings.dat": ("::", False, "'user::item::rating::timestamp'"),
    "ratings.csv": (",", True, "'userId,movieId,rating,timestamp' after a header line"),
}


def find_ratings_file(path: str | Path) -> Path:
    """The ratings file itself, or the known one inside a MovieLens folder."""
    path = Path(path)
    if path.is_dir():
        for name in FORMATS:
            if (path / name).is_file():
                return path / name
        raise PoeemError(
            "MovieLens folder",
            f"one of {list(FORMATS)} inside",
            f"'{path}'",
            "point --data-path at an extracted MovieLens folder",
        )
    return require_file(path, "MovieLens ratings file", DATA_PATH_FIX)


def load_movielens(
    path: str | Path,
    min_rating: float = 0.0,
    split: Split = "leave-last-out",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> InteractionData:
    """Implicit-feedback retrieval data from MovieLens ratings.

    Args:
        path: a ratings file or a folder holding one.
        min_rating: ratings below this are dropped; the rest are positives.
        split: "leave-last-out" (latest rating per user held out) or "random" per-user holdout.
        test_fraction: share held out per user with ``split="random"``.
    """
    file = find_ratings_file(path)
    if file.name not in FORMATS:
        raise PoeemError(
            "MovieLens file name",
            f"one of {list(FORMATS)}",
            f"'{file.name}'",
            "rename it, or load it with the generic table loader",
        )
    sep, header, expected = FORMATS[file.name]
    df = read_numeric_table(file, sep, COLUMNS, header, expected, encoding="latin-1")
    df = df[df["rating"] >= min_rating]
    if df.empty:
        raise PoeemError(f"{file}", f"ratings >= min_rating={min_rating}", "none", "lower min_rating")
    users, user_keys = dense_ids(df["user"].to_numpy())
    items, item_keys = dense_ids(df["item"].to_numpy())
    num_users, num_items = int(users.max()) + 1, int(items.max()) + 1
    train_q, train_i, test = split_per_query(
        users, items, df["time"].to_numpy(), num_users, split, test_fraction, seed
    )
    return InteractionData(
        name=f"movielens:{file.name}",
        train_queries=train_q,
        train_items=train_i,
        num_queries=num_users,
        num_items=num_items,
        test=test,
        query_keys=user_keys,
        item_keys=item_keys,
    )
