"""Brute-force search over un-quantized embeddings, chunked over queries."""

from __future__ import annotations

import torch

from poeem.metric import Metric, check_metric, prepare_queries


def chunk_rows(n_queries: int, n_items: int, budget: int = 1 << 24) -> int:
    """Queries per chunk so that a chunk's score matrix has at most ``budget`` entries."""
    return max(1, min(n_queries, budget // max(1, n_items)))


class FlatIndex:
    """Exact search: every item scored against every query.

    Args:
        xb: (nb, dim) item embeddings.
        metric: "ip", "cosine" (queries and items normalised) or "l2".
    """

    def __init__(self, xb: torch.Tensor, metric: Metric = "ip") -> None:
        check_metric(metric)
        self.metric = metric
        self.xb = prepare_queries(xb, metric, xb.shape[1])  # same normalisation as queries
        self.norms = self.xb.pow(2).sum(-1)

    @property
    def ntotal(self) -> int:
        """Number of items."""
        return self.xb.shape[0]

    def search(
        self, xq: torch.Tensor, k: int, nprobe: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items per query (``nprobe`` is ignored).

        Returns:
            D: (nq, k) scores (similarities; squared distances for l2); I: (nq, k) int64 rows.
        """
        xq = prepare_queries(xq, self.metric, self.xb.shape[1]).to(self.xb.device)
        k = min(k, self.ntotal)
        d_parts, i_parts = [], []
        step = chunk_rows(xq.shape[0], self.ntotal)
        for start in range(0, xq.shape[0], step):
            q = xq[start : start + step]
            s = q @ self.xb.T  # (nq_chunk, nb)
            if self.metric == "l2":
                s = q.pow(2).sum(-1, keepdim=True) - 2 * s + self.norms
                d, i = s.topk(k, dim=1, largest=False)
            else:
                d, i = s.topk(k, dim=1)
            d_parts.append(d)
            i_parts.append(i)
        return torch.cat(d_parts), torch.cat(i_parts)
