"""An index as an immutable base plus small appended segments and tombstones (as Lucene and
Milvus keep theirs), so that an update writes what it adds, not the whole index.

The live index is: the base's items that are not removed, then each segment's items that are
not removed. FAISS searches the base once (its removed ids filtered by an ``IDSelector``, or,
for the index types that take none, dropped from a bounded over-fetch, see
:meth:`SegmentedFaissSearcher.search`) and a small in-memory index of the live segment items
built from the same centroids and codebooks; both probe the same lists and score alike, so the
merged top-k is the top-k of the rebuilt index. Compaction folds segments and tombstones into a
new base.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

import faiss
import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.faiss_codec import build_faiss_index
from poeem.index.tensors import IndexTensors
from poeem.metric import Metric, worst_score
from poeem.search.faiss_backend import FaissSearcher, search_parameters

SEGMENT_ROLE = "segment"  # roles "segment:<v>" (codes) and "segment_keys:<v>" (string ids)
TOMBSTONES_ROLE = "tombstones"
# compaction runs when the segments hold this share of the base, or there are this many
COMPACT_SHARE = 0.1
COMPACT_MIN_ROWS = 10_000
MAX_SEGMENTS = 64


def segment_payload(segment: IndexTensors) -> dict[str, torch.Tensor]:
    """What a segment file holds: (n,) lists, (n, D) codes, (n,) FAISS ids and, for an index
    that keeps its items' vectors, their (n, dim) stored rows."""
    out = {"coarse_codes": segment.coarse_codes, "codes": segment.codes, "ids": segment.ids}
    if segment.vectors is not None:
        out["vectors"] = segment.vectors
    return out


@dataclass(frozen=True)
class SegmentedIndex:
    """The live index of a directory version: ``base`` plus ``segments``, minus ``removed``.

    base: the exported (or last compacted) index.
    segments: items added since, oldest first (they share the base's centroids and codebooks).
    removed: (t,) FAISS ids removed since the base (from the base or a segment).
    """

    base: IndexTensors
    segments: tuple[IndexTensors, ...] = ()
    removed: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # the base's ids, sorted once and shared by every later version (membership in O(log n))
    base_sorted_ids: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.base_sorted_ids is None:
            object.__setattr__(self, "base_sorted_ids", torch.sort(self.base.ids).values)

    @property
    def ntotal(self) -> int:
        """Live items."""
        return self.base.ntotal + self.segment_rows - int(self.removed.numel())

    def ever_held(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which FAISS ``ids`` the base or a segment holds, removed or not."""
        assert self.base_sorted_ids is not None
        ids = ids.long()
        held = torch.from_numpy(sorted_member(self.base_sorted_ids.numpy(), ids.numpy()))
        for segment in self.segments:
            held |= torch.isin(ids, segment.ids)
        return held

    def holds(self, ids: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which FAISS ``ids`` are live items."""
        return self.ever_held(ids) & ~torch.isin(ids, self.removed)

    def segment_of(
        self,
        coarse_codes: torch.Tensor,
        codes: torch.Tensor,
        ids: torch.Tensor,
        vectors: torch.Tensor | None = None,
    ) -> IndexTensors:
        """A segment of new items: (n,) lists, (n, D) codes, (n,) FAISS ids and, exactly when the
        base keeps vectors, their (n, dim) stored rows (validated)."""
        if (vectors is None) != (self.base.vectors is None):
            raise PoeemError(
                "segment",
                "item vectors exactly when the index keeps them",
                f"vectors {'given' if vectors is not None else 'missing'}",
                "re-export the index, or restore the directory from a backup",
            )
        return replace(self.base, coarse_codes=coarse_codes, codes=codes, ids=ids, vectors=vectors).validate()

    def with_segment(self, segment: IndexTensors) -> SegmentedIndex:
        """This index plus ``segment``."""
        return SegmentedIndex(self.base, (*self.segments, segment), self.removed, self.base_sorted_ids)

    def without(self, ids: torch.Tensor) -> SegmentedIndex:
        """This index minus the FAISS ``ids`` (which it holds)."""
        removed = torch.cat([self.removed, ids.long()]).unique()
        return SegmentedIndex(self.base, self.segments, removed, self.base_sorted_ids)

    @cached_property
    def live(self) -> IndexTensors:
        """Every live item, base first: what a rebuilt index would hold."""
        return _drop(concat_rows(self.base, [self.base, *self.segments]), self.removed)

    @cached_property
    def delta(self) -> IndexTensors | None:
        """The live segment items, or None when there are none."""
        if not self.segments:
            return None
        return _drop(self.merged().segments[0], self.removed)

    @property
    def segment_rows(self) -> int:
        """Items held in segments (removed ones included)."""
        return sum(s.ntotal for s in self.segments)

    def needs_compaction(self) -> bool:
        """Whether the segments or tombstones have grown enough to fold them into the base."""
        grown = max(self.segment_rows, int(self.removed.numel()))
        return grown >= max(COMPACT_MIN_ROWS, COMPACT_SHARE * self.base.ntotal)

    def needs_merge(self) -> bool:
        """Whether there are so many segments that they should become one."""
        return len(self.segments) >= MAX_SEGMENTS

    def merged(self) -> SegmentedIndex:
        """The same index with its segments concatenated into one (oldest first)."""
        one = concat_rows(self.base, self.segments)
        return SegmentedIndex(self.base, (one,), self.removed, self.base_sorted_ids)


def sorted_member(sorted_values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which ``ids`` (any shape, int64) are in the ascending (n,) ``sorted_values``: bool, the
    shape of ``ids``; O(log n) each."""
    if not sorted_values.size:
        return np.zeros(ids.shape, dtype=bool)
    # the last value <= each id; -1 (every value is larger) reads the largest, which differs
    return sorted_values[np.searchsorted(sorted_values, ids, "right") - 1] == ids


def concat_rows(base: IndexTensors, parts: list[IndexTensors] | tuple[IndexTensors, ...]) -> IndexTensors:
    """The rows (lists, codes, ids, vectors) of ``parts`` one after the other, with ``base``'s
    rotation, centroids and codebooks."""
    vectors = [p.vectors for p in parts]
    return replace(
        base,
        coarse_codes=torch.cat([p.coarse_codes for p in parts]),
        codes=torch.cat([p.codes for p in parts]),
        ids=torch.cat([p.ids for p in parts]),
        vectors=torch.cat(vectors) if all(v is not None for v in vectors) else None,  # type: ignore[misc]
    )


def _drop(index: IndexTensors, removed: torch.Tensor) -> IndexTensors:
    if not removed.numel():
        return index
    keep = ~torch.isin(index.ids, removed)
    vectors = index.vectors[keep] if index.vectors is not None else None
    return replace(
        index,
        coarse_codes=index.coarse_codes[keep],
        codes=index.codes[keep],
        ids=index.ids[keep],
        vectors=vectors,
    )


class SegmentedFaissSearcher:
    """``search(xq, k, nprobe) -> (D, I)`` over a base FAISS index and the live segment items.

    Args:
        base: the base's FAISS index (read from the directory; never changed).
        index: the live index it belongs to.
        metric: "ip", "cosine" or "l2".
        fast_scan: whether the segment index is built as fast scan, like the base.
    """

    def __init__(self, base: faiss.Index, index: SegmentedIndex, metric: Metric, fast_scan: bool) -> None:
        self.metric = metric
        removed = index.removed  # sorted (unique)
        self._selector: Any = None
        self._filter_after = False
        if removed.numel():
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(removed.numpy(), dtype=np.int64))
            self._selector = faiss.IDSelectorNot(batch)
            self._selector.referenced_batch = batch  # keep it alive as long as the selector
            # FAISS filters ids while it scans only some index types (not a flat PQ, nor an
            # additive quantizer); the others drop removed ids from a bounded over-fetch
            if not takes_selector(base, self._selector):
                self._selector, self._filter_after = None, True
        assert index.base_sorted_ids is not None
        self._removed = removed.numpy()
        self._base_removed = int(sorted_member(index.base_sorted_ids.numpy(), self._removed).sum())
        self.base = FaissSearcher(base, selector=self._selector)
        self._base_total = self.base.ntotal  # removed items included
        delta = index.delta
        self.delta = (
            FaissSearcher(build_faiss_index(delta, metric, fast_scan))
            if delta is not None and delta.ntotal
            else None
        )

    @property
    def ntotal(self) -> int:
        """Live items."""
        return self._base_total - self._base_removed + (self.delta.ntotal if self.delta is not None else 0)

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: xq (nq, dim). Returns D (nq, k) float32 scores and I (nq, k) int64 ids.

        A base that FAISS filters with an id selector is searched for k. Any other base with
        removed ids is searched for :meth:`first_width` results, removed ids are dropped, and
        only the queries left with fewer than k live results (their whole fetch full) are
        searched again, 4 times wider each round, up to k plus the base's removed ids.
        """
        if self._filter_after:
            d, i = self._search_filtered(xq, k, nprobe)
        else:
            d, i = self.base.search(xq, k, nprobe)
        if self.delta is None:
            return d, i
        d2, i2 = self.delta.search(xq, k, nprobe)
        return merge_top_k(torch.cat([d, d2], 1), torch.cat([i, i2], 1), k, self.metric)

    def first_width(self, k: int) -> int:
        """Results fetched per query in the first round of a filtered search, (k + 3 sqrt(k p) +
        1) / (1 - p) with p the base's removed share: k live ones, and three standard deviations
        of the removed ones among them (with random removes, about 1 query in 1,000 then needs
        a second round, at most 1 in 400 up to p = 0.5)."""
        total = self._base_total
        p = self._base_removed / max(total, 1)
        width = math.ceil((k + 3 * math.sqrt(k * p) + 1) / max(1 - p, 1 / max(total, 1)))
        return max(1, min(width, k + self._base_removed, total))

    def _search_filtered(self, xq: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The base's k best live results per query (over-fetch and drop removed ids); in
        numpy, whose small-array operations cost a single query less than torch's."""
        limit, width = min(k + self._base_removed, self._base_total), self.first_width(k)
        pending: np.ndarray | None = None  # the queries searched again; None: all, first round
        while True:
            d, i = self.base.search(xq if pending is None else xq[torch.from_numpy(pending)], width, nprobe)
            d, i = d.numpy(), i.numpy()
            live = (i >= 0) & ~sorted_member(self._removed, i)
            if pending is None:
                if live[:, :k].all():  # no query lost one of its first k: FAISS's top k stands
                    return torch.from_numpy(d[:, :k].copy()), torch.from_numpy(i[:, :k].copy())
                pending = np.arange(xq.shape[0])
                out_d = np.full((xq.shape[0], k), worst_score(self.metric), np.float32)
                out_i = np.full((xq.shape[0], k), -1, np.int64)
            rank = live.cumsum(1)  # FAISS ranks best first: the first k live results stay
            rows, cols = np.nonzero(live & (rank <= k))
            out_d[pending[rows], rank[rows, cols] - 1] = d[rows, cols]
            out_i[pending[rows], rank[rows, cols] - 1] = i[rows, cols]
            # short of k live results although FAISS filled the fetch: more may lie beyond it
            pending = pending[(i[:, -1] >= 0) & (rank[:, -1] < k)]
            if width >= limit or not pending.size:
                return torch.from_numpy(out_d), torch.from_numpy(out_i)
            width = min(4 * width, limit)


def takes_selector(index: faiss.Index, selector: faiss.IDSelector) -> bool:
    """Whether FAISS searches ``index`` with an id ``selector`` (it refuses one for some index
    types); tried on one query."""
    probe = np.ones((1, index.d), np.float32)
    params = search_parameters(index, 1, selector)
    try:
        index.search(probe, 1, params=params[0])
    except RuntimeError:
        return False
    return True


def merge_top_k(
    scores: torch.Tensor, ids: torch.Tensor, k: int, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of each row of (nq, m) candidates; rows' missing entries (-1) sort last.

    Returns:
        (nq, k) scores and ids.
    """
    worst = float("inf") if metric == "l2" else float("-inf")
    keyed = torch.where(ids >= 0, scores, torch.full_like(scores, worst))
    order = torch.argsort(keyed, dim=1, descending=metric != "l2", stable=True)[:, :k]
    return scores.gather(1, order), ids.gather(1, order)
