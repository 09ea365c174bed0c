"""The synthetic task of the original Poeem tutorial, generated from a seed in seconds.

Query and item ids are 0..9999 (four decimal digits). A query whose last two digits are x, y
is relevant to an item when x and y are the digits at two different positions of the item's
four digits. A training pair draws a random item, two of its digit positions in random order,
and a random query prefix, so relevance is known for every (query, item) pair.
"""

from __future__ import annotations

import numpy as np

from poeem.data.interactions import InteractionData

VOCAB = 10_000


def item_digits(items: np.ndarray) -> np.ndarray:
    """(..., 4) decimal digits of item ids, most significant first."""
    items = np.asarray(items)
    return np.stack([(items // 10**p) % 10 for p in (3, 2, 1, 0)], axis=-1)


def synthetic_relevance(queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Whether each item is relevant to its query.

    Args:
        queries: (n,) query ids.
        items: (n, k) item ids.

    Returns:
        (n, k) bool.
    """
    x = (queries // 10) % 10
    y = queries % 10
    digits = item_digits(items)  # (n, k, 4)
    is_x = digits == x[:, None, None]
    is_y = digits == y[:, None, None]
    # two distinct positions p != p' with digit[p] = x and digit[p'] = y
    pair = is_x[..., :, None] & is_y[..., None, :]  # (n, k, 4, 4)
    off_diagonal = ~np.eye(4, dtype=bool)
    return (pair & off_diagonal).any(axis=(-1, -2))


def relevant_counts() -> np.ndarray:
    """(VOCAB,) number of relevant items of every query; it depends only on the last two digits."""
    items = np.arange(VOCAB)
    per_suffix = np.array([synthetic_relevance(np.array([s]), items[None])[0].sum() for s in range(100)])
    return per_suffix[np.arange(VOCAB) % 100]


def synthetic_task(num_pairs: int = 1_000_000, seed: int = 0) -> InteractionData:
    """The tutorial's task: 10,000 queries, 10,000 items, ``num_pairs`` training pairs."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, VOCAB, num_pairs)
    digits = item_digits(items)  # (n, 4)
    positions = rng.random((num_pairs, 4)).argsort(axis=1)[:, :2]  # two distinct positions
    xy = np.take_along_axis(digits, positions, axis=1)
    queries = rng.integers(0, VOCAB, num_pairs) // 100 * 100 + xy[:, 0] * 10 + xy[:, 1]
    return InteractionData(
        name="synthetic",
        relevant_counts=relevant_counts(),
        train_queries=queries,
        train_items=items,
        num_queries=VOCAB,
        num_items=VOCAB,
        relevance=synthetic_relevance,
        exclude_train=False,
    )
