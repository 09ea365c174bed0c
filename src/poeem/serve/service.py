"""The index behind the HTTP service: searches on an immutable snapshot, copy-on-write updates.

A :class:`~poeem.Searcher` is never changed while requests use it. ``add``, ``remove`` and
``reload`` build a new one, publish it (for writes, through the index directory's lock and
compare-and-swap), then swap the reference; requests already running finish on the old one.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.index_dir import StaleIndexError, read_manifest
from poeem.metric import prepare_queries
from poeem.model.query_encoder import Query
from poeem.search.searcher import Backend, Searcher, found


@dataclass
class Hits:
    """Results of one query, best first, in the items' own ids."""

    ids: list[Any]
    scores: list[float]


def set_search_threads(threads: int) -> None:
    """Threads FAISS (OpenMP) and torch use inside one search. A server runs many searches at
    once from its request thread pool, so 1 avoids oversubscribing the cores."""
    import faiss

    faiss.omp_set_num_threads(threads)
    torch.set_num_threads(threads)


class IndexService:
    """A served index directory.

    Args:
        directory: written by ``poeem export``.
        backend: "faiss" or "torch".
    """

    def __init__(self, directory: str | Path, backend: Backend = "faiss") -> None:
        self.directory, self.backend = Path(directory), backend
        self._searcher = Searcher.load(self.directory, backend=backend)
        self._write_lock = threading.Lock()
        self.loaded_at = time.time()

    @property
    def searcher(self) -> Searcher:
        """The snapshot new requests use."""
        return self._searcher

    # ------------------------------------------------------------------ search
    def search(
        self, queries: list[Query], k: int, nprobe: int, rerank: float | None = None
    ) -> tuple[list[Hits], int]:
        """Top-k of each query, with each query's ``exclude`` ids removed; ``rerank`` as
        :meth:`Searcher.search <poeem.search.reader.IndexReader.search>` takes it.

        Returns:
            One :class:`Hits` per query, and the index version that answered.
        """
        searcher = self._searcher  # one snapshot for the whole request
        xq = searcher.queries.encode(queries)
        exclude = [q.exclude for q in queries] if any(q.exclude for q in queries) else None
        scores, ids = searcher.search(
            xq, min(k, max(1, searcher.ntotal)), min(nprobe, searcher.nlist), exclude=exclude, rerank=rerank
        )
        out = []
        for row_ids, row_scores, row_found in zip(ids, scores, found(ids), strict=True):
            out.append(Hits(row_ids[row_found].tolist(), row_scores[row_found].tolist()))
        return out, searcher.version

    # ----------------------------------------------------------------- updates
    def add(self, embeddings: list[list[float] | None], texts: list[str | None], ids: np.ndarray) -> Searcher:
        """Add items, each given by its embedding or (text indexes) its text, and publish a new
        version; returns the searcher of that version."""

        def update(searcher: Searcher) -> None:
            dim = searcher.manifest.dim
            x = torch.zeros(len(ids), dim)
            given = [i for i, e in enumerate(embeddings) if e is not None]
            if given:
                x[given] = prepare_queries([embeddings[i] for i in given], "ip", dim, "items to add")
            written = [i for i, t in enumerate(texts) if t is not None]
            if written:
                x[written] = searcher.embed_item_texts([str(texts[i]) for i in written])
            searcher.add(x, ids)

        return self._write(update)

    def remove(self, ids: np.ndarray) -> tuple[int, Searcher]:
        """Remove items and publish a new version; returns (removed, the new version's searcher)."""
        removed: list[int] = []
        published = self._write(lambda s: removed.append(s.remove(ids)))
        return removed[0], published

    def _write(self, update: Any) -> Searcher:
        with self._write_lock:
            for attempt in range(2):
                fresh = self._writable()
                try:
                    update(fresh)
                except StaleIndexError:  # another process published in between: retry once
                    if attempt:
                        raise
                    continue
                self._swap(fresh)
                return fresh
        raise AssertionError("unreachable")

    def _writable(self) -> Searcher:
        """A searcher to update: a fork of the served one while it is the newest version (an
        update then costs what it adds), else a fresh load."""
        try:
            on_disk = read_manifest(self.directory, verify=False).version
        except PoeemError:
            on_disk = None
        if on_disk == self._searcher.version:
            return self._searcher.fork()
        return Searcher.load(self.directory, backend=self.backend)

    def reload(self) -> tuple[int, int]:
        """Load the newest version and swap it in; a broken one is refused and the old one kept.

        Returns:
            (previous version, current version).
        """
        with self._write_lock:
            previous = self._searcher.version
            self._swap(Searcher.load(self.directory, backend=self.backend))
            return previous, self._searcher.version

    def reload_if_changed(self) -> bool:
        """Reload when the manifest on disk names another version (cheap: reads the manifest)."""
        try:
            on_disk = read_manifest(self.directory, verify=False).version
        except PoeemError:
            return False  # a broken manifest is not served; the current index stays
        if on_disk == self._searcher.version:
            return False
        try:
            self.reload()
        except PoeemError:
            return False
        return True

    def _swap(self, searcher: Searcher) -> None:
        self._searcher = searcher
        self.loaded_at = time.time()
