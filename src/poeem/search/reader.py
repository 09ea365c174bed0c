"""Open an index directory once, then search it: the read side of :class:`poeem.Searcher`.

Made for a long-running server: loading verifies checksums, and searching is read-only and
batched. Ids are the user's own at every entry and exit: item ids in results, query ids in
:attr:`IndexReader.queries` (the :class:`~poeem.model.query_encoder.QueryEncoder` of the saved
query tower and text encoder).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.faiss_codec import nbits_of
from poeem.export.index_dir import (
    REEXPORT,
    Manifest,
    MissingIndexFile,
    read_manifest,
    role_stem,
)
from poeem.export.item_vectors import VECTORS_ROLE
from poeem.ids import IdMap, integer_text
from poeem.index.tensors import IndexTensors
from poeem.metric import check_search_args, prepare_queries, worst_score
from poeem.model.query_encoder import QueryEncoder
from poeem.model.towers import Tower
from poeem.search.adc import TorchIVFPQ
from poeem.search.rerank import (
    DEFAULT_RERANK_FACTOR,
    NEEDS_VECTORS_FIX,
    StoredVectors,
    candidates,
    check_rerank,
    rescore,
)
from poeem.search.segments import (
    SEGMENT_ROLE,
    TOMBSTONES_ROLE,
    SegmentedFaissSearcher,
    SegmentedIndex,
)
from poeem.storage import read_json, read_tensors

Backend = Literal["faiss", "torch"]
LOAD_ATTEMPTS = 5


def _role_version(role: str) -> int:
    """The version that wrote a segment role ``segment:<v>``."""
    return int(role.split(":")[1])


def _version_on_disk(directory: Path) -> int | None:
    """The version the directory's manifest names now (None when it cannot be read)."""
    try:
        return read_manifest(directory, verify=False).version
    except (PoeemError, OSError):
        return None


def found(ids: np.ndarray) -> np.ndarray:
    """Which entries of :meth:`Searcher.search`'s ids are results: (nq, k) bool, False where the
    row ran short (-1, or "" for string ids)."""
    return ids != ("" if ids.dtype.kind in "UO" else -1)


class IndexReader:
    """Search a saved learned index by query embeddings or, with a saved query tower, by query ids.

    Use :meth:`load` to open a directory. ``backend="faiss"`` searches the exported FAISS index;
    ``backend="torch"`` runs poeem's own ADC, which scores as FAISS does, fast scan included
    (usable on GPU through ``device``; where the two can differ: :mod:`poeem.search.adc`).
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        index: SegmentedIndex,
        backend: Backend = "faiss",
        device: str = "cpu",
        query_tower: Tower | None = None,
        query_features: torch.Tensor | None = None,
        query_keys: IdMap | None = None,
        item_keys: IdMap | None = None,
    ) -> None:
        if backend not in ("faiss", "torch"):
            raise PoeemError("backend", "'faiss' or 'torch'", repr(backend), "pick one of those")
        self.directory, self.manifest, self.index = directory, manifest, index
        self.backend, self.device, self.query_tower = backend, device, query_tower
        self.query_features, self.query_keys, self.item_keys = query_features, query_keys, item_keys
        self._text_encoders: dict[str, Any] = {}  # text query/document encoders, loaded when first used
        self._max_norm = index.base.max_norm()  # segments share the base's centroids and codebooks
        self._base_faiss: Any = None  # the base's FAISS index, read once (shared by forks)
        self.vector_codec = manifest.vector_codec  # how the items' vectors are kept, or None
        self._build_engine()

    @property
    def tensors(self) -> IndexTensors:
        """The live index (base and segments, removed items left out) as tensors."""
        return self.index.live

    def fork(self) -> Self:
        """A copy to update while this one keeps serving: it shares the immutable base (and its
        FAISS index), and an update replaces the copy's state without touching this one's."""
        return copy.copy(self)

    # -------------------------------------------------------------------- load
    @classmethod
    def load(cls, directory: str | Path, backend: Backend = "faiss", device: str = "cpu") -> Self:
        """Open an index directory, verifying its checksums.

        A writer may publish a newer version while this loads and delete the files this load
        was reading; the load then starts over from the new manifest.
        """
        directory = Path(directory)
        for attempt in range(LOAD_ATTEMPTS):
            before = _version_on_disk(directory)
            try:
                return cls._load_once(directory, backend, device)
            except (PoeemError, OSError):
                # a file that vanished or changed under a new version: any error of the read
                if attempt == LOAD_ATTEMPTS - 1 or before is None or _version_on_disk(directory) == before:
                    raise
        raise AssertionError("unreachable")

    @classmethod
    def _load_once(cls, directory: Path, backend: Backend, device: str) -> Self:
        manifest = read_manifest(directory)
        files = manifest.files

        def tensors_of(role: str) -> dict[str, torch.Tensor]:
            if not (directory / files[role]).is_file():
                raise MissingIndexFile(files[role])
            return read_tensors(directory / files[role], f"index file '{files[role]}'", REEXPORT)

        def keys_of(role: str) -> IdMap | None:
            if role not in files:
                return None
            if not (directory / files[role]).is_file():
                raise MissingIndexFile(files[role])
            return IdMap.from_json(read_json(directory / files[role], role, REEXPORT), role)

        base = IndexTensors.from_dict(tensors_of("codes"))
        codec = manifest.vector_codec
        if codec is not None:  # memory-mapped: pages are read when candidates are re-scored
            name = files[VECTORS_ROLE]
            if not (directory / name).is_file():
                raise MissingIndexFile(name)
            stored = read_tensors(directory / name, f"index file '{name}'", REEXPORT, mmap=True).get(
                "vectors"
            )
            if stored is None:
                raise PoeemError(f"index file '{name}'", "a tensor 'vectors'", "none", REEXPORT)
            base.vectors = codec.check_rows(stored, base.ntotal, manifest.dim, f"index file '{name}'")
        index = SegmentedIndex(base)
        item_keys, added_keys = keys_of("item_keys"), []
        for role in sorted((r for r in files if role_stem(r) == SEGMENT_ROLE), key=_role_version):
            part = tensors_of(role)
            vectors = part.get("vectors")
            if codec is not None:
                what = f"index file '{files[role]}'"
                vectors = codec.check_rows(
                    vectors if vectors is not None else torch.zeros(0),
                    part["ids"].numel(),
                    manifest.dim,
                    what,
                )
            segment = index.segment_of(part["coarse_codes"], part["codes"], part["ids"], vectors)
            index = index.with_segment(segment)
            keys = keys_of(f"segment_keys:{_role_version(role)}")
            if keys is not None:
                added_keys.append(keys.keys.astype(object))
        if added_keys:  # string ids of the segments' items follow the base's
            assert item_keys is not None
            item_keys = IdMap(np.concatenate([item_keys.keys.astype(object), *added_keys]))
        if TOMBSTONES_ROLE in files:
            index = index.without(tensors_of(TOMBSTONES_ROLE)["ids"].long())
        tower, features = None, None
        if manifest.query_tower is not None and "query_tower" in files:
            tower = Tower.from_config(manifest.query_tower)
            try:
                tower.load_state_dict(tensors_of("query_tower"))
            except RuntimeError as err:
                raise PoeemError(
                    "query tower file", "weights matching its config", str(err)[:200], REEXPORT
                ) from None
            tower.eval()
            if "query_features" in files:
                features = tensors_of("query_features").get("features")
        return cls(
            directory, manifest, index, backend, device, tower, features, keys_of("query_keys"), item_keys
        )

    def _build_engine(self) -> None:
        import faiss

        if self.backend == "faiss":
            if self._base_faiss is None:
                path = self.directory / self.manifest.files["faiss"]
                try:
                    self._base_faiss = faiss.read_index(str(path))
                except RuntimeError as err:
                    if not path.is_file():
                        raise MissingIndexFile(path.name) from None
                    raise PoeemError(
                        "FAISS index file", "a readable index", f"'{path}' ({err})", REEXPORT
                    ) from None
            self._engine: Any = SegmentedFaissSearcher(
                self._base_faiss,
                self.index,
                self.metric,  # type: ignore[arg-type]
                self.manifest.fast_scan,
            )
        else:
            self._engine = TorchIVFPQ(
                replace(self.tensors, vectors=None).to(self.device),
                self.metric,  # type: ignore[arg-type]
                fast_scan=self.manifest.fast_scan,
            )
        codec = self.vector_codec
        self._vectors = StoredVectors(self.index, codec) if codec is not None else None
        try:  # one query, so that a version FAISS cannot search is refused here, not per request
            self._engine.search(torch.ones(1, self.manifest.dim), 1, 1)
        except RuntimeError as err:
            raise PoeemError(
                "index",
                "an index that can be searched",
                f"'{self.directory}' ({err})",
                f"this version is neither served nor published; {REEXPORT}",
            ) from None

    # ------------------------------------------------------------------ search
    @property
    def metric(self) -> str:
        """The index metric: "ip", "cosine" or "l2"."""
        return self.manifest.metric

    @property
    def ntotal(self) -> int:
        """Number of items in the index."""
        return self.index.ntotal

    @property
    def nlist(self) -> int:
        """Number of IVF lists (1 without a coarse quantizer)."""
        return self.index.base.nlist  # segments share the base's centroids

    def describe(self) -> str:
        """The index in a few words: lists, code size and scan, e.g. "1024 lists, 8 bytes per
        item (16 x 4-bit PQ codes), fast scan"."""
        spec = self.manifest.spec
        bits = nbits_of(spec.codebook_size)
        codes = f"{spec.num_subspaces} x {bits}-bit {spec.quantizer.upper()} codes"
        scan = ", fast scan" if self.manifest.fast_scan else ""
        codec = self.vector_codec
        kept = (
            f", + {codec.bytes_per_item(self.manifest.dim)} bytes of {codec.precision} vectors"
            if codec
            else ""
        )
        return f"{self.nlist} lists, {spec.num_subspaces * bits / 8:g} bytes per item ({codes}){scan}{kept}"

    @property
    def version(self) -> int:
        """The index directory version this searcher holds."""
        return self.manifest.version

    def search(
        self,
        xq: torch.Tensor | np.ndarray,
        k: int = 10,
        nprobe: int = 1,
        batch_size: int = 4096,
        exclude: Sequence[Iterable[Any]] | None = None,
        rerank: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items of each query embedding.

        Args:
            xq: (nq, dim) finite float query embeddings.
            k: results per query; more than the index holds is clamped, with a warning.
            nprobe: IVF lists probed; more than there are is clamped, with a warning.
            exclude: nq collections of the items' own ids to leave out of each query's
                results (ids the index does not hold are ignored). A query searches k plus
                its own number of excluded items, so one long list costs only that query.
            rerank: F, re-rank with the items' stored vectors (an index exported with
                ``--rerank``): the codes' top ceil(F k) candidates are re-scored exactly
                (:mod:`poeem.search.rerank`) and the best k returned; 0 or 1: off. None: the
                index's default, :data:`~poeem.search.rerank.DEFAULT_RERANK_FACTOR` for an index
                with vectors, off for one without.

        Returns:
            D: (nq, k) float32 scores (similarity for ip/cosine, squared distance for l2);
            I: (nq, k) the items' own ids: int64 with -1 where fewer than k were found, or
            strings with "" there, for an index with string ids.
        """
        check_search_args(k, nprobe)
        xq = prepare_queries(xq, self.metric, self.manifest.dim)  # cosine: normalised robustly here
        self._check_scores_fit(xq)
        if exclude is not None and len(exclude) != xq.shape[0]:
            raise PoeemError(
                "exclude", f"one collection of ids per query ({xq.shape[0]})", str(len(exclude)), "align them"
            )
        if k > self.ntotal:
            warnings.warn(
                f"k={k} is larger than the {self.ntotal} items in the index; using k={self.ntotal}",
                stacklevel=2,
            )
            k = max(1, self.ntotal)
        if nprobe > self.nlist:
            warnings.warn(
                f"nprobe={nprobe} is larger than the {self.nlist} lists; using nprobe={self.nlist}",
                stacklevel=2,
            )
            nprobe = self.nlist
        factor = self.rerank_factor(rerank)
        width = candidates(factor, k, self.ntotal)
        d, i = self._search_batched(xq, width, nprobe, batch_size)
        if exclude is not None:
            d, i = self._exclude(xq, width, nprobe, batch_size, d, i, [self._index_ids(e) for e in exclude])
        if width > k:
            assert self._vectors is not None
            d, i = rescore(xq.numpy(), i, self._vectors, k, self.metric)
        return d, self._raw_item_ids(i)

    @property
    def stored_vectors(self) -> StoredVectors | None:
        """The live items' stored vectors by FAISS id (what re-ranking reads), or None."""
        return self._vectors

    def rerank_factor(self, rerank: float | None) -> float:
        """The re-ranking factor a search with ``rerank`` uses (validated): None is the index's
        default; a factor above 1 on an index without stored vectors is a clear error."""
        if rerank is None:
            return DEFAULT_RERANK_FACTOR if self._vectors is not None else 0.0
        factor = check_rerank(rerank)
        if factor > 1 and self._vectors is None:
            raise PoeemError(
                "rerank factor",
                "an index that keeps its items' vectors (exported with --rerank)",
                f"factor {factor:g} on an index of codes only",
                NEEDS_VECTORS_FIX,
            )
        return factor

    def _check_scores_fit(self, xq: torch.Tensor) -> None:
        """Refuse queries whose scores could overflow float32 (FAISS then drops every result, and
        JSON cannot carry inf): |<q, x>| <= ||q|| ||x|| and ||q - x||^2 <= (||q|| + ||x||)^2."""
        if self.metric == "cosine":  # queries are normalised
            return
        q = xq.double().norm(dim=-1)
        bound = (q + self._max_norm) ** 2 if self.metric == "l2" else q * self._max_norm
        too_big = bound > float(np.finfo(np.float32).max) / 2
        if bool(too_big.any()):
            rows = torch.nonzero(too_big).flatten()
            raise PoeemError(
                "queries",
                "vectors whose scores fit in float32",
                f"{rows.numel()} rows too large, e.g. row {int(rows[0])} (norm {float(q[rows[0]]):.3g})",
                "scale those query embeddings down",
            )

    def _search_batched(
        self, xq: torch.Tensor, k: int, nprobe: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(nq, k) scores and FAISS ids, searched ``batch_size`` queries at a time."""
        d_parts, i_parts = [], []
        for start in range(0, xq.shape[0], batch_size):
            d, i = self._engine.search(xq[start : start + batch_size], k, nprobe)
            d_parts.append(d.cpu().numpy())
            i_parts.append(i.cpu().numpy())
        if not d_parts:
            return np.zeros((0, k), np.float32), np.full((0, k), -1, np.int64)
        return np.concatenate(d_parts), np.concatenate(i_parts)

    def _index_ids(self, raw: Iterable[Any]) -> np.ndarray:
        """FAISS ids of the items' own ids that the index holds (others dropped)."""
        values = list(raw)
        if self.item_keys is None or self.item_keys.is_integer:  # "12" names item 12 too
            values = [int(v) for v in values if isinstance(v, int | np.integer) or integer_text(str(v))]
            values = [v for v in values if 0 <= v < 2**63]  # no FAISS id lies outside
        rows = self.item_keys.lookup(values) if self.item_keys is not None else np.array(values, np.int64)
        rows = np.asarray(rows, np.int64)
        return rows[self.index.holds(torch.from_numpy(rows)).numpy()]

    def _exclude(
        self,
        xq: torch.Tensor,
        k: int,
        nprobe: int,
        batch_size: int,
        d: np.ndarray,
        i: np.ndarray,
        dropped: list[np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Results without each query's dropped ids; queries that lost some are searched again,
        grouped by their own width (k plus their number of dropped items)."""
        widths = np.array([min(k + len(x), self.ntotal) for x in dropped], np.int64)
        hit = np.array([bool(np.isin(row, x).any()) for row, x in zip(i, dropped, strict=True)], bool)
        out_d = np.full_like(d, worst_score(self.metric))
        out_i = np.full_like(i, -1)
        for width in np.unique(widths[hit]):
            rows = np.flatnonzero(hit & (widths == width))
            wd, wi = self._search_batched(xq[torch.from_numpy(rows)], int(width), nprobe, batch_size)
            for r, row_d, row_i in zip(rows, wd, wi, strict=True):
                keep = ~np.isin(row_i, dropped[r])
                n = min(k, int(keep.sum()))
                out_d[r, :n], out_i[r, :n] = row_d[keep][:n], row_i[keep][:n]
        out_d[~hit], out_i[~hit] = d[~hit], i[~hit]
        return out_d, out_i

    @property
    def queries(self) -> QueryEncoder:
        """The index's query encoder: query ids through the saved query tower (with the saved
        features), texts through the saved text query encoder, or embeddings."""
        tower = self.query_tower
        normalize = bool((self.manifest.query_tower or {}).get("normalize"))
        has_text = self.manifest.text_query is not None and "text_query" in self.manifest.files
        return QueryEncoder(
            self.manifest.dim,
            tower,
            num_ids=0 if tower is None else tower.num_ids,
            num_features=0 if tower is None else tower.num_numeric,
            features=self.query_features,
            keys=self.query_keys,
            normalize=normalize,
            text=(lambda texts: self._text_side("query", texts)) if has_text else None,
        )

    def query_rows(self, query_ids: Any) -> torch.Tensor:
        """The query tower's (nq,) int64 rows of the queries' own ids; unknown ids are an error."""
        return self.queries.rows(query_ids)

    def embed_queries(
        self, query_ids: Any, features: torch.Tensor | np.ndarray | None = None
    ) -> torch.Tensor:
        """(nq, dim) float32 embeddings of (nq,) queries by their own ids, through the saved query
        tower, with (nq, F) ``features`` or the ones saved at export (:meth:`QueryEncoder.by_ids`)."""
        return self.queries.by_ids(query_ids, features)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """(nq, dim) float32 embeddings of (nq,) query texts, through the saved text query encoder."""
        return self.queries.by_texts(texts)

    def embed_item_texts(self, texts: list[str]) -> torch.Tensor:
        """Document embeddings of texts, through the saved text document encoder: what
        :meth:`Searcher.add <poeem.search.searcher.Searcher.add>` takes to add documents by text.

        Args:
            texts: (n,) document texts (a title and a body joined by a space, as in training).

        Returns:
            (n, dim) float32 embeddings, as the text model's document tower computes them.
        """
        return self._text_side("item", texts)

    def _text_side(self, side: Literal["query", "item"], texts: list[str]) -> torch.Tensor:
        config = self.manifest.text_query if side == "query" else self.manifest.text_item
        role, name = f"text_{side}", "query" if side == "query" else "document"
        if config is None or role not in self.manifest.files:
            raise PoeemError(
                f"{name} text",
                f"an index exported from a text model (with its {name} encoder)",
                f"an index without a text {name} encoder",
                f"use {name} ids or embeddings, or export a run trained with --data beir again",
            )
        if side not in self._text_encoders:
            from poeem.model.text import TextSideEncoder

            path = self.directory / self.manifest.files[role]
            if not path.is_file():
                raise MissingIndexFile(path.name)
            state = read_tensors(path, f"text {name} encoder", REEXPORT)
            self._text_encoders[side] = TextSideEncoder.from_state(config, state, name)
        return self._text_encoders[side](texts)

    def _raw_item_ids(self, faiss_ids: np.ndarray, keys: IdMap | None = None) -> np.ndarray:
        """The items' own ids of FAISS ids (the same array without an item map)."""
        keys = keys if keys is not None else self.item_keys
        return keys.raw(faiss_ids) if keys is not None else faiss_ids
