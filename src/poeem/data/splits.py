"""Turning one list of (query, item, time) interactions into train and held-out test pairs."""

from __future__ import annotations

from typing import Literal

import numpy as np

from poeem.data.interactions import CSR

Split = Literal["leave-last-out", "random"]


def split_per_query(
    queries: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    num_queries: int,
    how: Split = "leave-last-out",
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, CSR]:
    """Hold out items per query; queries with a single interaction stay fully in training.

    A (query, item) pair seen several times counts once, at its latest time, so a held-out
    item never also sits in training.

    Args:
        queries, items, times: (n,) arrays of one interaction each.
        how: "leave-last-out" holds out each query's latest interaction; "random" holds out a
            random ``test_fraction`` of each query's interactions (at least one).

    Returns:
        train_queries (m,), train_items (m,), and the held-out items as a :class:`CSR`.
    """
    rng = np.random.default_rng(seed)
    by_pair = np.lexsort((times, items, queries))  # the last row of each pair is its latest
    last = np.ones(len(by_pair), dtype=bool)
    last[:-1] = (queries[by_pair][1:] != queries[by_pair][:-1]) | (items[by_pair][1:] != items[by_pair][:-1])
    unique_rows = np.sort(by_pair[last])
    queries, items, times = queries[unique_rows], items[unique_rows], times[unique_rows]
    tiebreak = rng.random(len(queries))
    if how == "leave-last-out":
        order = np.lexsort((tiebreak, times, queries))  # by query, then time
    else:
        order = np.lexsort((tiebreak, queries))  # by query, random within
    q = queries[order]
    counts = np.bincount(q, minlength=num_queries)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_from_end = counts[q] - (np.arange(len(q)) - starts[q])  # 1 for the last of each query
    if how == "leave-last-out":
        held = np.ones_like(counts)
    else:
        held = np.maximum(1, np.floor(counts * test_fraction)).astype(np.int64)
    is_test = (rank_from_end <= held[q]) & (counts[q] >= 2)
    test_idx, train_idx = order[is_test], order[~is_test]
    return (
        queries[train_idx],
        items[train_idx],
        CSR.from_pairs(queries[test_idx], items[test_idx], num_queries),
    )
