"""The LightGCN / NGCF split format: ``train.txt`` and ``test.txt``, one line per user,
``user item item ...``, ids already dense and 0-based (Gowalla, Yelp2018, Amazon-Book)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from poeem.data.files import DATA_PATH_FIX
from poeem.data.interactions import CSR, InteractionData
from poeem.user_files import malformed, require_file


def read_adjacency_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Stream ``user item item ...`` lines into (n,) user and item arrays."""
    users: list[np.ndarray] = []
    items: list[np.ndarray] = []
    with path.open() as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ids = np.array(line.split(), dtype=np.int64)
            except ValueError:
                raise malformed(path, no, "'user item item ...' of non-negative integers", line) from None
            if (ids < 0).any():
                raise malformed(path, no, "non-negative integer ids", line)
            users.append(np.full(len(ids) - 1, ids[0]))
            items.append(ids[1:])
    if not users:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(users), np.concatenate(items)


def load_lightgcn(folder: str | Path) -> InteractionData:
    """Load ``train.txt`` and ``test.txt`` from a LightGCN-style dataset folder."""
    folder = Path(folder)
    train_u, train_i = read_adjacency_lines(
        require_file(folder / "train.txt", "LightGCN train.txt", DATA_PATH_FIX)
    )
    test_u, test_i = read_adjacency_lines(
        require_file(folder / "test.txt", "LightGCN test.txt", DATA_PATH_FIX)
    )
    num_users = int(max(train_u.max(initial=-1), test_u.max(initial=-1))) + 1
    num_items = int(max(train_i.max(initial=-1), test_i.max(initial=-1))) + 1
    return InteractionData(
        name=f"lightgcn:{folder.name}",
        train_queries=train_u,
        train_items=train_i,
        num_queries=num_users,
        num_items=num_items,
        test=CSR.from_pairs(test_u, test_i, num_users),
    )
