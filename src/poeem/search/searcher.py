"""``poeem.Searcher``: an index directory to search (:class:`~poeem.search.reader.IndexReader`),
add items to and remove them from.

Updates are published as a new version of the directory under a writer lock with a
compare-and-swap on the version (see :mod:`poeem.export.index_dir`); the new items are coded
with the frozen codebooks, and nothing is retrained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.faiss_codec import build_faiss_index
from poeem.export.index_dir import role_stem, write_version
from poeem.export.index_writer import write_index
from poeem.export.item_vectors import VECTORS_ROLE
from poeem.ids import IdMap, check_ids
from poeem.index.quantize import encode_rotated
from poeem.index.tensors import IndexTensors
from poeem.metric import prepare_queries
from poeem.search.reader import Backend, IndexReader, found
from poeem.search.segments import SEGMENT_ROLE, TOMBSTONES_ROLE, SegmentedIndex, concat_rows, segment_payload

__all__ = ["Backend", "Searcher", "found"]


class Searcher(IndexReader):
    """An :class:`IndexReader` that also adds and removes items, each update published as a new
    version of its directory. Use :meth:`create` to write a directory from a trained layer and
    :meth:`load` to open one."""

    @classmethod
    def create(cls, directory: str | Path, *args: Any, **kwargs: Any) -> Searcher:
        """Write a new index directory (:func:`poeem.export.index_writer.write_index`, same
        arguments) and open it."""
        write_index(directory, *args, **kwargs)
        return cls.load(directory)

    def add(self, items: torch.Tensor | np.ndarray, ids: Any) -> None:
        """Add items, coded with the frozen codebooks (no retraining), and publish a new version.

        The new items go to a new segment file (the update writes what it adds); re-adding an
        id removed since the last compaction, or segments grown past their share of the index,
        folds everything into a new base instead (:meth:`compact`).

        Args:
            items: (n, dim) item embeddings, as the item tower produces them (before the layer);
                normalised here for a cosine index. An index that keeps its items' vectors
                (``--rerank``) keeps theirs too, in the same segment file.
            ids: (n,) the items' own ids, none already in the index.

        Raises:
            StaleIndexError: another writer changed the directory since this was loaded.
        """
        # a cosine model L2-normalises items before its layer: code them the same way
        x = prepare_queries(items, self.metric, self.manifest.dim, what="items to add")
        item_keys = self.item_keys
        if item_keys is None:
            new_ids = check_ids(ids, x.shape[0], "ids to add")
        else:
            item_keys, rows = item_keys.extend(ids, x.shape[0])
            new_ids = torch.from_numpy(rows)
        held = self.index.ever_held(new_ids)  # also removed ones, whose rows are still stored
        taken = held & ~torch.isin(new_ids, self.index.removed)
        if taken.any():
            shown = new_ids[taken][:5].numpy()
            raise PoeemError(
                "ids to add",
                "ids not already in the index",
                f"{int(taken.sum())} existing ids, e.g. {self._raw_item_ids(shown, item_keys).tolist()}",
                "remove them first, or use new ids",
            )
        base = self.index.base
        cc, codes = encode_rotated(
            x @ base.rotation,
            base.coarse,
            base.codebooks,
            self.manifest.spec.coarse_metric,
            bulk=True,
        )
        cc = cc if cc is not None else torch.zeros(x.shape[0], dtype=torch.long)
        vectors = self.vector_codec.encode(x) if self.vector_codec is not None else None
        segment = self.index.segment_of(cc, codes, new_ids, vectors)
        if held.any():  # a removed id comes back while its old row is still stored: fold into a new base
            live = self.index.live
            self._compact(concat_rows(live, [live, segment]), item_keys)
            return
        grown = self.index.with_segment(segment)
        if grown.needs_compaction() or (grown.needs_merge() and item_keys is not None):
            self._compact(grown.live, item_keys)
            return
        role = f"{SEGMENT_ROLE}:{self.version + 1}"  # the version this update publishes
        if grown.needs_merge():  # many small segments become one (integer ids: no key files)
            grown = grown.merged()
            old_segments = tuple(r for r in self.manifest.files if role_stem(r) == SEGMENT_ROLE)
            self._publish({role: segment_payload(grown.segments[0])}, grown, drop=old_segments)
            return
        payloads: dict[str, Any] = {role: segment_payload(segment)}
        known = len(self.item_keys or ())
        if item_keys is not None and len(item_keys) > known:  # string ids: the new ones
            payloads[f"segment_keys:{self.version + 1}"] = item_keys.keys[known:].tolist()
        self._publish(payloads, grown, item_keys)

    def remove(self, ids: Any) -> int:
        """Remove items by their own ids and publish a new version; returns how many were removed.

        The update writes the removed ids (tombstones), not the index. Unknown ids are a clear
        error (nothing is changed).
        """
        if self.item_keys is not None:
            drop = torch.from_numpy(self.item_keys.rows(ids, "ids to remove"))
        else:
            drop = check_ids(ids, what="ids to remove", unique=False)
        unknown = drop[~self.index.holds(drop)]
        if unknown.numel():
            shown = unknown[:5].numpy()
            raise PoeemError(
                "ids to remove",
                "ids present in the index",
                f"unknown ids {self._raw_item_ids(shown).tolist()}",
                "check the ids (nothing was removed)",
            )
        smaller = self.index.without(drop)
        if smaller.needs_compaction():
            self._compact(smaller.live)
        else:
            self._publish({TOMBSTONES_ROLE: {"ids": smaller.removed}}, smaller)
        return int(drop.unique().numel())

    def compact(self) -> None:
        """Fold the segments and tombstones into a new base (one FAISS index and one codes
        file) and publish it; searches return the same results before and after."""
        self._compact(self.index.live)

    def _compact(self, live: IndexTensors, item_keys: IdMap | None = None) -> None:
        faiss_index = build_faiss_index(live, self.metric, self.manifest.fast_scan)  # type: ignore[arg-type]
        keys = item_keys if item_keys is not None else self.item_keys
        payloads: dict[str, Any] = {"faiss": faiss_index, "codes": live.to_dict()}
        if live.vectors is not None:
            payloads[VECTORS_ROLE] = {"vectors": live.vectors}
        if keys is not None:
            payloads["item_keys"] = keys.to_json()
        merged = tuple(
            r for r in self.manifest.files if role_stem(r) in (SEGMENT_ROLE, "segment_keys", TOMBSTONES_ROLE)
        )
        self._publish(payloads, SegmentedIndex(live), keys, drop=merged, base_faiss=faiss_index)

    def _publish(
        self,
        payloads: dict[str, Any],
        index: SegmentedIndex,
        item_keys: IdMap | None = None,
        drop: tuple[str, ...] = (),
        base_faiss: Any = None,
    ) -> None:
        """Write ``payloads`` as the next version and make ``index`` (with ``base_faiss``, the
        FAISS index of a new base) this searcher's state."""
        before = (self.index, self._base_faiss, self.item_keys, self._engine, self._vectors)
        self.index = index
        if base_faiss is not None:
            self._base_faiss = base_faiss
        if item_keys is not None:
            self.item_keys = item_keys
        try:
            self._build_engine()  # a version that cannot be searched is never published
            self.manifest = write_version(self.directory, self.manifest, self.manifest, payloads, drop=drop)
        except BaseException:
            self.index, self._base_faiss, self.item_keys, self._engine, self._vectors = before
            raise
