"""The one in-memory form every loader produces: (query, item) training pairs plus held-out truth."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from poeem.errors import PoeemError
from poeem.ids import IdMap

# relevance(queries (n,), items (n, k)) -> (n, k) bool, for tasks whose truth is a rule
RelevanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass
class CSR:
    """Per-query item lists: the items of query q are ``indices[indptr[q]:indptr[q + 1]]``."""

    indptr: np.ndarray  # (num_queries + 1,) int64
    indices: np.ndarray  # (nnz,) int64

    @classmethod
    def from_pairs(cls, queries: np.ndarray, items: np.ndarray, num_queries: int) -> CSR:
        """Build from (n,) query and item ids; duplicates are kept once, lists sorted."""
        order = np.lexsort((items, queries))
        q, i = queries[order], items[order]
        keep = np.ones(len(q), dtype=bool)
        keep[1:] = (q[1:] != q[:-1]) | (i[1:] != i[:-1])
        q, i = q[keep], i[keep]
        indptr = np.zeros(num_queries + 1, dtype=np.int64)
        np.add.at(indptr, q + 1, 1)
        return cls(np.cumsum(indptr), i.astype(np.int64))

    def row(self, q: int) -> np.ndarray:
        """(n_q,) items of query q."""
        return self.indices[self.indptr[q] : self.indptr[q + 1]]

    def lengths(self) -> np.ndarray:
        """(num_queries,) number of items per query."""
        return np.diff(self.indptr)

    def contains(self, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether ``items[q, r]`` is in the list of query ``rows[q]``; negative items are not.

        Args:
            rows: (nq,) query ids; items: (nq, K) item ids.

        Returns:
            (nq, K) bool.
        """
        if getattr(self, "_keys", None) is None:  # built once per CSR
            self._width = int(self.indices.max(initial=0)) + 1
            query_of = np.repeat(np.arange(len(self.indptr) - 1), self.lengths())
            self._keys = np.sort(query_of * self._width + self.indices)
        keys, width = self._keys, self._width
        valid = (items >= 0) & (items < width)
        if not len(keys):
            return np.zeros(items.shape, dtype=bool)
        query_keys = rows[:, None] * width + np.where(valid, items, 0)
        pos = np.searchsorted(keys, query_keys).clip(max=len(keys) - 1)
        return (keys[pos] == query_keys) & valid


@dataclass
class InteractionData:
    """A retrieval task: training pairs, and either held-out pairs or a relevance rule.

    Ids are dense: queries in [0, num_queries), items in [0, num_items). ``query_keys`` and
    ``item_keys`` map them back to the data's own ids (None when the data's ids are already
    dense). Optional numeric side features are per id: ``query_features`` (num_queries, Fq),
    ``item_features`` (num_items, Fi); text data carries ``query_texts`` and ``item_texts``.
    """

    name: str
    train_queries: np.ndarray  # (n,) int64
    train_items: np.ndarray  # (n,) int64
    num_queries: int
    num_items: int
    test: CSR | None = None  # held-out items per query
    relevance: RelevanceFn | None = None  # exact relevance, for synthetic tasks
    relevant_counts: np.ndarray | None = None  # (num_queries,) relevant items, with relevance
    exclude_train: bool = True  # mask each query's training items at evaluation
    query_features: np.ndarray | None = None
    item_features: np.ndarray | None = None
    query_keys: IdMap | None = None
    item_keys: IdMap | None = None
    query_texts: list[str] | None = None  # (num_queries,) for text towers
    item_texts: list[str] | None = None  # (num_items,)

    def __post_init__(self) -> None:
        self.train_queries = np.asarray(self.train_queries, dtype=np.int64)
        self.train_items = np.asarray(self.train_items, dtype=np.int64)
        if self.train_queries.shape != self.train_items.shape or self.train_queries.ndim != 1:
            raise PoeemError(
                f"{self.name} training pairs",
                "two (n,) id arrays of equal length",
                f"shapes {self.train_queries.shape} and {self.train_items.shape}",
                "pass one query id and one item id per pair",
            )
        if self.relevance is not None and self.relevant_counts is None:
            raise PoeemError(
                f"{self.name}",
                "relevant_counts with a relevance rule",
                "none",
                "pass the number of relevant items per query",
            )
        if self.test is None and self.relevance is None:
            raise PoeemError(
                f"{self.name}",
                "held-out test pairs or a relevance rule",
                "neither",
                "pass test= or relevance=",
            )

    @property
    def num_train(self) -> int:
        """Number of training pairs."""
        return len(self.train_queries)

    def train_csr(self) -> CSR:
        """Training items per query (for masking them at evaluation); built once, then reused."""
        if getattr(self, "_train_csr", None) is None:
            self._train_csr = CSR.from_pairs(self.train_queries, self.train_items, self.num_queries)
        return self._train_csr

    def eval_queries(self) -> np.ndarray:
        """(nq,) the queries evaluated: all with held-out items, or all for a relevance rule."""
        if self.test is None:
            return np.arange(self.num_queries)
        return np.flatnonzero(self.test.lengths() > 0)

    def item_popularity(self) -> np.ndarray:
        """(num_items,) training-pair count per item, for the logQ correction."""
        return np.bincount(self.train_items, minlength=self.num_items)

    def summary(self) -> str:
        """One line describing the data."""
        held = f"{len(self.test.indices)} test pairs" if self.test is not None else "rule-based relevance"
        return (
            f"{self.name}: {self.num_queries} queries, {self.num_items} items, "
            f"{self.num_train} train pairs, {held}"
        )
