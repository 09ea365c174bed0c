"""Evaluating a retrieval model through any search backend, LightGCN protocol:
full ranking over all items, each query's training items excluded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from poeem.data.interactions import CSR, InteractionData
from poeem.evaluation.metrics import ranking_metric_sums


class Searchable(Protocol):
    """A backend: ``search(xq (nq, dim), k, nprobe) -> (D, I)`` with item ids in I."""

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...


EXTRA_WIDTH = 256  # results fetched beyond k in the first pass, to make room for exclusions
SCORE_BUDGET = 1 << 22  # results held at once when re-searching queries with many exclusions


def _search_dropping(
    index: Searchable,
    xq: torch.Tensor,
    rows: np.ndarray,
    width: int,
    k: int,
    nprobe: int,
    exclude: CSR | None,
) -> np.ndarray:
    """(nq, k) ids of the top ``width`` results with excluded ids removed, order kept."""
    _, ids = index.search(xq, width, nprobe)
    ids = ids.cpu().numpy()
    if exclude is not None:
        ids = np.where(exclude.contains(rows, ids), -1, ids)
        keep_order = np.argsort(ids < 0, axis=1, kind="stable")  # valid ids first, order kept
        ids = np.take_along_axis(ids, keep_order, axis=1)
    out = np.full((len(rows), k), -1, dtype=np.int64)
    out[:, : min(k, ids.shape[1])] = ids[:, :k]
    return out


def search_excluding(
    index: Searchable,
    xq: torch.Tensor,
    rows: np.ndarray,
    k: int,
    nprobe: int,
    exclude: CSR | None,
    num_items: int,
) -> np.ndarray:
    """Top-k item ids per query with the query's ``exclude`` items removed.

    Memory stays bounded however many items a query excludes: the first pass fetches at most
    k + 256 results per query; only the queries that may have lost results to exclusions are
    searched again, each with room for its own exclusions, in row chunks of bounded size.

    Args:
        index: the backend; xq: (nq, dim) queries; rows: (nq,) their query ids.
        k: results kept; nprobe: lists probed.
        exclude: items to drop per query id, or None.
        num_items: items in the index (the largest useful width).

    Returns:
        (nq, k) int64 item ids, -1 where fewer than k remain.
    """
    lengths = exclude.lengths()[rows] if exclude is not None else np.zeros(len(rows), dtype=np.int64)
    width = min(num_items, k + min(int(lengths.max(initial=0)), EXTRA_WIDTH))
    out = _search_dropping(index, xq, rows, width, k, nprobe, exclude)
    again = np.flatnonzero((k + lengths > width) & (width < num_items))
    again = again[np.argsort(lengths[again], kind="stable")]
    start = 0
    while start < len(again):
        row_width = min(num_items, k + int(lengths[again[start]]))
        step = max(1, SCORE_BUDGET // row_width)
        part = again[start : start + step]
        row_width = min(num_items, k + int(lengths[part].max()))
        out[part] = _search_dropping(index, xq[part], rows[part], row_width, k, nprobe, exclude)
        start += len(part)
    return out


def evaluate_retrieval(
    index: Searchable,
    encode_queries: Callable[[np.ndarray], torch.Tensor],
    data: InteractionData,
    ks: tuple[int, ...] = (20, 50, 100),
    nprobe: int = 1,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Ranking metrics of a backend on the data's evaluation queries, in query batches (memory
    does not grow with the number of queries).

    Args:
        index: the search backend over all items.
        encode_queries: (nq,) query ids -> (nq, dim) query embeddings.
        data: held-out pairs (``data.test``) or a relevance rule (``data.relevance``).
        ks: metric cut-offs.
        nprobe: lists probed by IVF backends.
    """
    rows_all = data.eval_queries()
    exclude = data.train_csr() if data.exclude_train else None
    kmax = max(ks)
    totals: dict[str, float] = {}
    for start in range(0, len(rows_all), batch_size):
        rows = rows_all[start : start + batch_size]
        with torch.no_grad():
            xq = encode_queries(rows)
        topk = search_excluding(index, xq, rows, kmax, nprobe, exclude, data.num_items)
        if data.relevance is not None:
            hits = data.relevance(rows, np.where(topk < 0, 0, topk)) & (topk >= 0)
            assert data.relevant_counts is not None
            num_relevant = data.relevant_counts[rows]
        else:
            assert data.test is not None
            hits, num_relevant = data.test.contains(rows, topk), data.test.lengths()[rows]
        for name, value in ranking_metric_sums(hits, num_relevant, ks).items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: value / max(1, len(rows_all)) for name, value in totals.items()}
