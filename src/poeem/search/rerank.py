"""Re-ranking: the codes' top F·k candidates of each query, re-scored with the items' stored
vectors (:mod:`poeem.export.item_vectors`), and the best k of them returned.

The re-scoring is one gather and one batched matmul per chunk of queries, in numpy (whose
small-array operations cost a single query less than torch's): the candidates' stored rows are
looked up by FAISS id (the row itself for the usual consecutive ids, else a binary search over the
base's sorted ids, and another over the segments'), and scored exactly as the index's metric says
(inner product, cosine on normalised vectors, or squared L2 distance). SQ8 rows are not decoded
for inner products: <q, lo + r step> = <q step, r> + <q, lo>.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.item_vectors import VectorCodec
from poeem.metric import worst_score
from poeem.search.segments import SegmentedIndex

# F of a search that names none, on an index with stored vectors: every point of the re-ranking
# front on Gowalla re-scored 2k candidates (docs/benchmarks.md, "Re-ranking with kept vectors")
DEFAULT_RERANK_FACTOR = 2.0
# a factor past this re-scores more candidates than any frontier point needed
MAX_RERANK_FACTOR = 100
# (candidates x dim) floats gathered at once: a chunk of queries stays in cache (1 MiB)
GATHER_FLOATS = 1 << 18
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
    """FAISS ids -> stored item vectors of a live index (base rows and segment rows).

    Args:
        index: the index; its base and every segment hold ``vectors``.
        codec: how the rows are stored.
    """

    def __init__(self, index: SegmentedIndex, codec: VectorCodec) -> None:
        base = index.base
        assert base.vectors is not None and all(s.vectors is not None for s in index.segments)
        self.codec, self.dim = codec, base.dim
        self._base_rows = base.vectors.numpy()  # may be a memory map: rows are read when gathered
        ids = base.ids.numpy()
        n = len(ids)
        # ids first, first + 1, ... (an export's 0..n-1, the data's own rows): the row is id - first
        self._first = int(ids[0]) if n and np.array_equal(ids, np.arange(ids[0], ids[0] + n)) else None
        self._base_order: np.ndarray | None = None
        if self._first is None:
            self._base_order = np.argsort(ids, kind="stable")
            self._base_ids = ids[self._base_order]
        self._seg_ids = np.zeros(0, np.int64)
        self._seg_rows: np.ndarray | None = None
        if index.segments:
            seg_ids = torch.cat([s.ids for s in index.segments]).numpy()
            order = np.argsort(seg_ids, kind="stable")
            self._seg_ids = seg_ids[order]
            self._seg_rows = torch.cat([s.vectors for s in index.segments]).numpy()[order]  # type: ignore[misc]
        if codec.precision == "sq8":
            assert codec.lo is not None
            self._lo = codec.lo.numpy().astype(np.float32)
            self._step = codec.step.numpy().astype(np.float32)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(n,) int64 FAISS ids of live items (or -1) -> (n, dim) stored rows (any row for -1)."""
        if self._first is not None and self._seg_rows is None and len(self._base_rows):
            # every live id is a base row: one gather, -1 (and nothing else) clipped to row 0
            return np.take(self._base_rows, ids - self._first, axis=0, mode="clip")
        if self._first is not None:
            pos = ids - self._first
            in_base = (pos >= 0) & (pos < len(self._base_rows))
        else:
            pos = np.searchsorted(self._base_ids, ids).clip(max=max(len(self._base_ids) - 1, 0))
            in_base = self._base_ids[pos] == ids if len(self._base_ids) else np.zeros(len(ids), bool)
            assert self._base_order is not None
            pos = self._base_order[pos] if len(self._base_order) else pos
        out = np.take(self._base_rows, np.where(in_base, pos, 0), axis=0) if len(self._base_rows) else None
        if self._seg_rows is not None:
            rest = ~in_base & (ids >= 0)
            if rest.any():
                found = np.searchsorted(self._seg_ids, ids[rest])
                assert (self._seg_ids[found.clip(max=len(self._seg_ids) - 1)] == ids[rest]).all()
                if out is None:
                    out = np.zeros((len(ids), self.dim), self._seg_rows.dtype)
                out[rest] = self._seg_rows[found]
        if out is None:  # an empty base and no segment rows asked for
            out = np.zeros((len(ids), self.dim), np.float32)
        return out

    def decode(self, rows: np.ndarray) -> np.ndarray:
        """(..., dim) stored rows -> (..., dim) float32 vectors."""
        if self.codec.precision == "fp16":  # torch converts half precision faster than numpy
            return torch.from_numpy(np.ascontiguousarray(rows)).float().numpy()
        if self.codec.precision == "float":
            return rows
        return self._lo + rows.astype(np.float32) * self._step

    def scores(self, xq: np.ndarray, ids: np.ndarray, metric: str, buffer: np.ndarray) -> np.ndarray:
        """The exact scores of (c, dim) float32 queries against their (c, m) candidates' stored
        vectors: (c, m) float32 inner products, or squared distances for "l2" (any value for -1).
        ``buffer``: at least c m dim float32 scratch, reused across calls (SQ8 rows are widened
        into it rather than into a fresh array)."""
        c, m = ids.shape
        rows = self.rows(ids.reshape(-1)).reshape(c, m, self.dim)  # (c, m, dim) stored
        if metric != "l2" and self.codec.precision == "sq8":  # <q, lo + r step> = <q step, r> + <q, lo>
            wide = buffer[: rows.size].reshape(rows.shape)
            np.copyto(wide, rows, casting="unsafe")
            out = np.matmul(wide, (xq * self._step)[:, :, None])[..., 0]
            return out + (xq @ self._lo)[:, None]
        x = self.decode(rows)  # (c, m, dim)
        ip = np.matmul(x, xq[:, :, None])[..., 0]  # (c, m)
        if metric != "l2":
            return ip
        return (xq * xq).sum(-1, keepdims=True) - 2 * ip + np.einsum("cmd,cmd->cm", x, x)


def rescore(
    xq: np.ndarray, ids: np.ndarray, vectors: StoredVectors, k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
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
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    chunk = max(1, GATHER_FLOATS // max(1, m * vectors.dim))
    d_out = np.empty((nq, k), np.float32)
    i_out = np.empty((nq, k), np.int64)
    buffer = np.empty(min(nq, chunk) * m * vectors.dim, np.float32)
    for start in range(0, nq, chunk):
        part = slice(start, start + chunk)
        q, cand = xq[part], ids[part]
        scores = vectors.scores(q, cand, metric, buffer)  # (c, m)
        d_out[part], i_out[part] = top_k(scores, cand, k, metric)
    return d_out, i_out


def top_k(scores: np.ndarray, ids: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The k best of each row of (c, m) ``scores`` (missing ids, -1, sort last), best first:
    (c, k) float32 scores (the metric's worst for missing ones) and int64 ids."""
    c, m = ids.shape
    key = np.where(ids >= 0, scores if metric == "l2" else -scores, np.inf)  # (c, m), smallest best
    r = np.arange(c)[:, None]
    part = np.argpartition(key, k - 1, axis=1)[:, :k] if m > k else np.broadcast_to(np.arange(m), (c, m))
    order = part[r, np.argsort(key[r, part], axis=1, kind="stable")]  # (c, k)
    best_ids = ids[r, order]
    missing = best_ids < 0
    best = np.where(missing, np.float32(worst_score(metric)), scores[r, order]).astype(np.float32, copy=False)
    return best, np.where(missing, -1, best_ids)
