"""Ranking metrics from a hit matrix; every metric is a mean over queries."""

from __future__ import annotations

import numpy as np


def ranking_metrics(hits: np.ndarray, num_relevant: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """recall@k, precision@k, ndcg@k and hit_rate@k, means over queries.

    Args: as :func:`ranking_metric_sums`.
    """
    return {
        name: total / max(1, len(hits)) for name, total in ranking_metric_sums(hits, num_relevant, ks).items()
    }


def ranking_metric_sums(hits: np.ndarray, num_relevant: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """recall@k, precision@k, ndcg@k and hit_rate@k, summed over queries (add batches, then divide).

    Args:
        hits: (nq, K) bool, hits[q, r] = the item ranked r for query q is relevant.
        num_relevant: (nq,) relevant items per query (the recall denominator).
        ks: cut-offs, each <= K.

    Returns:
        ``{"recall@20": ..., "precision@20": ..., "ndcg@20": ..., "hit_rate@20": ...}``.
    """
    hits = hits.astype(np.float32)  # one batch at a time: (nq, K) stays small
    num_relevant = np.maximum(num_relevant, 1).astype(np.float64)
    discount = 1.0 / np.log2(np.arange(hits.shape[1]) + 2)  # (K,)
    out = {}
    for k in ks:
        h = hits[:, :k]
        found = h.sum(1)
        ideal = np.cumsum(discount[:k])[np.minimum(num_relevant, k).astype(int) - 1]
        out[f"recall@{k}"] = float((found / num_relevant).sum())
        out[f"precision@{k}"] = float((found / k).sum())
        out[f"ndcg@{k}"] = float(((h * discount[:k]).sum(1) / ideal).sum())
        out[f"hit_rate@{k}"] = float((found > 0).sum())
    return out
