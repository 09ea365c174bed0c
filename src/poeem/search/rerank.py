"""Re-ranking: the codes' top F·k candidates of each query, re-scored with the items' stored
vectors (:mod:`poeem.export.item_vectors`), and the best k of them returned.

The re-scoring is one gather and one batched matmul per chunk of queries: the candidates' stored
rows are looked up by FAISS id (a binary search over the base's sorted ids, another over the
segments'), decoded to float32, and scored exactly as the index's metric says (inner product,
cosine on normalised vectors, or squared L2 distance).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.item_vectors import VectorCodec
from poeem.metric import worst_score
from poeem.search.segments import SegmentedIndex, merge_top_k

# F of a search that names none, on an index with stored vectors (docs/benchmarks.md, "Re-ranking")
DEFAULT_RERANK_FACTOR = 4.0
# a factor past this re-scores more candidates than any frontier point needed
MAX_RERANK_FACTOR = 100
# (candidates x dim) floats gathered at once: bounds the memory of a large batch
GATHER_FLOATS = 1 << 22
NEEDS_VECTORS_FIX = (
    "re-export the index with 'poeem export RUN --out DIR --rerank sq8' (or fp16, float) to keep "
    "each item's vector, or search without --rerank-factor"
)


def check_rerank(factor: object) -> float:
    """``factor`` as a float if it is a finite number in [0, :data:`MAX_RERANK_FACTOR`], else a
    clear error (0 and 1 turn re-ranking off)."""
    ok = isinstance(factor, int | float | np.integer | np.floating) and not isinstance(factor, bool)
    if not ok or not math.isfinite(float(factor)) or not 0 <= float(factor) <= MAX_RERANK_FACTOR:  # type: ignore[arg-type]
        raise PoeemError(
            "rerank factor",
            f"a number between 0 and {MAX_RERANK_FACTOR} (0 or 1: no re-ranking)",
            repr(factor)[:40],
            "pass e.g. 4 to re-score the top 4k candidates of the codes",
        )
    return float(factor)  # type: ignore[arg-type]


def candidates(factor: float, k: int, ntotal: int) -> int:
    """Candidates the codes return per query to re-rank to ``k``: ceil(factor k), at most
    ``ntotal``; ``k`` when re-ranking is off (factor <= 1)."""
    if factor <= 1:
        return k
    return max(k, min(math.ceil(factor * k), ntotal))


class StoredVectors:
    """FAISS ids -> decoded item vectors of a live index (base rows and segment rows).

    Args:
        index: the index; its base and every segment hold ``vectors``.
        codec: how the rows are stored.
    """

    def __init__(self, index: SegmentedIndex, codec: VectorCodec) -> None:
        base = index.base
        assert base.vectors is not None and all(s.vectors is not None for s in index.segments)
        self.codec, self.dim = codec, base.dim
        self._base_rows = base.vectors  # may be a memory map: rows are read when gathered
        ids = base.ids
        ascending = bool((ids[1:] >= ids[:-1]).all()) if ids.numel() > 1 else True
        self._base_ids = ids if ascending else index.base_sorted_ids
        self._base_order = None if ascending else torch.argsort(ids)
        if index.segments:
            seg_ids = torch.cat([s.ids for s in index.segments])
            order = torch.argsort(seg_ids)
            self._seg_ids = seg_ids[order]
            self._seg_rows: torch.Tensor | None = torch.cat([s.vectors for s in index.segments])[order]  # type: ignore[misc]
        else:
            self._seg_ids, self._seg_rows = torch.zeros(0, dtype=torch.long), None

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) int64 FAISS ids of live items (or -1) -> (..., dim) float32 vectors (zeros for -1)."""
        flat = ids.reshape(-1)
        out = torch.zeros(flat.numel(), self.dim)
        rows, in_base = _find(self._base_ids, flat)
        if self._base_order is not None:
            rows = self._base_order[rows]
        if bool(in_base.any()):
            out[in_base] = self.codec.decode(self._base_rows[rows[in_base]])
        rest = ~in_base & (flat >= 0)
        if self._seg_rows is not None and bool(rest.any()):
            seg, hit = _find(self._seg_ids, flat[rest])
            assert bool(hit.all()), "a candidate is neither in the base nor in a segment"
            out[rest] = self.codec.decode(self._seg_rows[seg])
        return out.reshape(*ids.shape, self.dim)


def _find(sorted_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of (n,) ``ids`` in ascending (m,) ``sorted_ids`` and whether each is there."""
    if not sorted_ids.numel():
        return torch.zeros_like(ids), torch.zeros(ids.shape, dtype=torch.bool)
    pos = torch.searchsorted(sorted_ids, ids).clamp_(max=sorted_ids.numel() - 1)
    return pos, sorted_ids[pos] == ids


def rescore(
    xq: torch.Tensor, ids: torch.Tensor, vectors: StoredVectors, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each query's candidates by the exact score against the stored vectors.

    Args:
        xq: (nq, dim) float32 queries (normalised for cosine, as the index searched them).
        ids: (nq, m) int64 FAISS ids of the candidates; -1 for none.
        vectors: the index's stored vectors.
        k: results per query (k <= m).
        metric: "ip", "cosine" (inner product of unit vectors) or "l2" (squared distance).

    Returns:
        D (nq, k) float32 scores and I (nq, k) int64 FAISS ids, best first; -1 where a query had
        fewer than k candidates.
    """
    nq, m = ids.shape
    chunk = max(1, GATHER_FLOATS // max(1, m * vectors.dim))
    d_parts, i_parts = [], []
    for start in range(0, nq, chunk):
        q, cand = xq[start : start + chunk].float(), ids[start : start + chunk]
        x = vectors.gather(cand)  # (c, m, dim)
        scores = torch.bmm(x, q.unsqueeze(2)).squeeze(2)  # (c, m)
        if metric == "l2":
            scores = (q * q).sum(-1, keepdim=True) - 2 * scores + (x * x).sum(-1)
        scores = torch.where(cand >= 0, scores, torch.full_like(scores, worst_score(metric)))
        d, i = merge_top_k(scores, cand, k, metric)
        d_parts.append(d)
        i_parts.append(i)
    if not d_parts:
        return torch.zeros(0, k), torch.full((0, k), -1, dtype=torch.long)
    return torch.cat(d_parts), torch.cat(i_parts)
