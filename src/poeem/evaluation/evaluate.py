"""Evaluating a retrieval model through any search backend, LightGCN protocol:
full ranking over all items, each query's training items excluded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from poeem.data.interactions import CSR, InteractionData
from poeem.evaluation.metrics import ranking_metrics


class Searchable(Protocol):
    """A backend: ``search(xq (nq, dim), k, nprobe) -> (D, I)`` with item ids in I."""

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]: ...


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

    Asks the backend for k + (the most excluded items of any query in the batch), then drops
    excluded ids, so every backend excludes the same way.

    Returns:
        (nq, k) int64 item ids, -1 where fewer than k remain.
    """
    extra = int(exclude.lengths()[rows].max(initial=0)) if exclude is not None else 0
    _, ids = index.search(xq, min(k + extra, num_items), nprobe)
    ids = ids.cpu().numpy()
    if exclude is not None and extra:
        ids = np.where(exclude.contains(rows, ids), -1, ids)
        keep_order = np.argsort(ids < 0, axis=1, kind="stable")  # valid ids first, order kept
        ids = np.take_along_axis(ids, keep_order, axis=1)
    out = np.full((len(rows), k), -1, dtype=np.int64)
    width = min(k, ids.shape[1])
    out[:, :width] = ids[:, :width]
    return out


def evaluate_retrieval(
    index: Searchable,
    encode_queries: Callable[[np.ndarray], torch.Tensor],
    data: InteractionData,
    ks: tuple[int, ...] = (20, 50, 100),
    nprobe: int = 1,
    batch_size: int = 2048,
) -> dict[str, float]:
    """Ranking metrics of a backend on the data's evaluation queries.

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
    hits_parts, nrel_parts = [], []
    for start in range(0, len(rows_all), batch_size):
        rows = rows_all[start : start + batch_size]
        with torch.no_grad():
            xq = encode_queries(rows)
        topk = search_excluding(index, xq, rows, kmax, nprobe, exclude, data.num_items)
        if data.relevance is not None:
            hits_parts.append(data.relevance(rows, np.where(topk < 0, 0, topk)) & (topk >= 0))
            assert data.relevant_counts is not None
            nrel_parts.append(data.relevant_counts[rows])
        else:
            assert data.test is not None
            hits_parts.append(data.test.contains(rows, topk))
            nrel_parts.append(data.test.lengths()[rows])
    return ranking_metrics(np.concatenate(hits_parts), np.concatenate(nrel_parts), ks)
