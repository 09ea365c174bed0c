"""``poeem.Searcher``: load an index directory once, then search it, add and remove items.

Made for a long-running server: loading verifies checksums, searching is read-only and
batched, and updates are published as a new version of the directory under a writer lock
with a compare-and-swap on the version (see :mod:`poeem.search.index_dir`). Ids are the
user's own at every entry and exit: item ids in results, ``add`` and ``remove``; query ids
in :meth:`Searcher.embed_queries`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from poeem.errors import PoeemError
from poeem.export.faiss_codec import build_faiss_index, default_fast_scan, nbits_of
from poeem.export.learned import ItemsOrCodes, export_learned
from poeem.ids import IdMap, check_ids, integer_text
from poeem.index import PoeemLayer
from poeem.index.quantize import encode_rotated
from poeem.index.tensors import IndexTensors
from poeem.metric import Metric, check_search_args, prepare_queries, worst_score
from poeem.model.towers import Tower
from poeem.search.adc import TorchIVFPQ
from poeem.search.index_dir import (
    REEXPORT,
    Manifest,
    MissingIndexFile,
    read_manifest,
    role_stem,
    write_version,
)
from poeem.search.segments import (
    SEGMENT_ROLE,
    TOMBSTONES_ROLE,
    SegmentedFaissSearcher,
    SegmentedIndex,
    concat_rows,
    segment_payload,
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


class Searcher:
    """Search a saved learned index by query embeddings or, with a saved query tower, by query ids.

    Use :meth:`create` to write a directory from a trained layer and :meth:`load` to open one.
    ``backend="faiss"`` searches the exported FAISS index; ``backend="torch"`` runs poeem's own
    ADC (same results; usable on GPU through ``device``).
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
        self._build_engine()

    @property
    def tensors(self) -> IndexTensors:
        """The live index (base and segments, removed items left out) as tensors."""
        return self.index.live

    def fork(self) -> Searcher:
        """A copy to update while this one keeps serving: it shares the immutable base (and its
        FAISS index), and an update replaces the copy's state without touching this one's."""
        return copy.copy(self)

    # ----------------------------------------------------------- create / load
    @classmethod
    def create(
        cls,
        directory: str | Path,
        layer: PoeemLayer,
        items: ItemsOrCodes,
        ids: Any = None,
        metric: Metric = "ip",
        fast_scan: bool | None = None,
        query_tower: Tower | None = None,
        normalize_queries: bool = False,
        query_keys: IdMap | None = None,
        query_features: torch.Tensor | None = None,
        text_query: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
        replace: bool = False,
        text_item: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
    ) -> Searcher:
        """Export a trained layer and its items into a new index directory (no training).

        Args:
            directory: where to write; an existing index there is an error, unless ``replace``
                (then this export is published there as its next version).
            layer: the trained :class:`PoeemLayer`.
            items: (n, dim) item embeddings, or ``layer.encode()``'s (coarse_codes, codes).
            ids: (n,) the items' own ids: non-negative integers (stored in FAISS as they are)
                or strings (FAISS stores row numbers, and the directory maps them back);
                0..n-1 by default.
            metric: "ip", "cosine" or "l2", as the model was trained.
            fast_scan: 4-bit fast-scan FAISS index (PQ with K = 16); None: fast scan exactly
                when the layer has such codes (:func:`default_fast_scan`).
            query_tower: the query tower, to search by query id.
            normalize_queries: whether the tower's output is L2-normalised (cosine models).
            query_keys: the raw query id of each tower row; None when ids are the rows.
            query_features: (num_queries, F) numeric features of each query row, for a tower
                with a feature MLP.
            text_query: a text model's ``query_side()`` (config, weights), to search by text.
            text_item: a text model's ``item_side()``, to add documents by text.
        """
        directory = Path(directory)
        item_keys = None
        if ids is not None and np.asarray(ids).dtype.kind in "UO":
            item_keys = IdMap(np.asarray(ids))
            ids = np.arange(len(item_keys))
        if fast_scan is None:
            fast_scan = default_fast_scan(layer.config)
        tensors, index = export_learned(layer, items, ids, metric, fast_scan)
        extra: dict[str, Any] = {}
        if query_tower is not None:
            extra["query_tower"] = query_tower.state_dict()
            if query_features is not None:
                extra["query_features"] = {"features": query_features.float()}
            if query_keys is not None:
                extra["query_keys"] = query_keys.to_json()
        if item_keys is not None:
            extra["item_keys"] = item_keys.to_json()
        if text_query is not None:
            extra["text_query"] = text_query[1]
        if text_item is not None:
            extra["text_item"] = text_item[1]
        tower_config = (
            None if query_tower is None else {**query_tower.config(), "normalize": normalize_queries}
        )
        manifest = Manifest(
            metric=metric,
            dim=layer.config.dim,
            layer=layer.config.to_dict(),
            fast_scan=fast_scan,
            query_tower=tower_config,
            text_query=text_query[0] if text_query is not None else None,
            text_item=text_item[0] if text_item is not None else None,
        )
        payloads = {"faiss": index, "codes": tensors.to_dict(), **extra}
        write_version(directory, None, manifest, payloads, replace=replace)
        return cls.load(directory)

    @classmethod
    def load(cls, directory: str | Path, backend: Backend = "faiss", device: str = "cpu") -> Searcher:
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
    def _load_once(cls, directory: Path, backend: Backend, device: str) -> Searcher:
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
        index = SegmentedIndex(base)
        item_keys, added_keys = keys_of("item_keys"), []
        for role in sorted((r for r in files if role_stem(r) == SEGMENT_ROLE), key=_role_version):
            part = tensors_of(role)
            index = index.with_segment(index.segment_of(part["coarse_codes"], part["codes"], part["ids"]))
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
            self._engine = TorchIVFPQ(self.tensors.to(self.device), self.metric)  # type: ignore[arg-type]
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
        return self.tensors.nlist

    def describe(self) -> str:
        """The index in a few words: lists, code size and scan, e.g. "1024 lists, 8 bytes per
        item (16 x 4-bit PQ codes), fast scan"."""
        layer = self.manifest.layer
        d, k = layer["num_subspaces"], layer["codebook_size"]
        bits = nbits_of(k)
        codes = f"{d} x {bits}-bit {layer.get('quantizer', 'pq').upper()} codes"
        scan = ", fast scan" if self.manifest.fast_scan else ""
        return f"{self.nlist} lists, {d * bits / 8:g} bytes per item ({codes}){scan}"

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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items of each query embedding.

        Args:
            xq: (nq, dim) finite float query embeddings.
            k: results per query; more than the index holds is clamped, with a warning.
            nprobe: IVF lists probed; more than there are is clamped, with a warning.
            exclude: nq collections of the items' own ids to leave out of each query's
                results (ids the index does not hold are ignored). A query searches k plus
                its own number of excluded items, so one long list costs only that query.

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
        d, i = self._search_batched(xq, k, nprobe, batch_size)
        if exclude is not None:
            d, i = self._exclude(xq, k, nprobe, batch_size, d, i, [self._index_ids(e) for e in exclude])
        return d, self._raw_item_ids(i)

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

    def query_rows(self, query_ids: Any) -> torch.Tensor:
        """The query tower's (nq,) int64 rows of the queries' own ids; unknown ids are an error."""
        if self.query_tower is None:
            raise PoeemError(
                "query ids",
                "an index exported with its query tower",
                "an index without one",
                "search with query embeddings (.npy), or export from a training run",
            )
        if self.query_keys is not None:
            return torch.from_numpy(self.query_keys.rows(query_ids, "query ids"))
        rows = check_ids(query_ids, what="query ids", unique=False)
        num_ids = self.query_tower.num_ids
        if rows.numel() and int(rows.max()) >= num_ids:
            raise PoeemError(
                "query ids",
                f"ids in [0, {num_ids})",
                f"max {int(rows.max())}",
                "pass ids of queries the model was trained on",
            )
        return rows

    def embed_queries(
        self, query_ids: Any, features: torch.Tensor | np.ndarray | None = None
    ) -> torch.Tensor:
        """Query embeddings through the saved query tower.

        Args:
            query_ids: (nq,) the queries' own ids (as in the training data).
            features: (nq, F) numeric features of these queries; by default the features
                saved at export for each query. Needed iff the tower has a feature MLP.

        Returns:
            (nq, dim) float32 embeddings, as the model scores them.
        """
        rows = self.query_rows(query_ids)
        assert self.query_tower is not None  # query_rows checked it
        if features is not None and not self.query_tower.num_numeric:
            raise PoeemError(
                "query features",
                "none: this index's query tower takes no features",
                f"{len(features)} feature rows",
                "search by query id alone",
            )
        feats = None
        if self.query_tower.num_numeric:
            if features is not None:
                feats = prepare_queries(features, "ip", self.query_tower.num_numeric, "query features")
            elif self.query_features is not None:
                feats = self.query_features[rows]
            else:
                raise PoeemError(
                    "query features",
                    f"{self.query_tower.num_numeric} features per query",
                    "none given and none saved in the index",
                    "pass the query features, or export the index from its training run",
                )
        with torch.no_grad():
            q = self.query_tower(rows, feats)
        return F.normalize(q, dim=-1) if (self.manifest.query_tower or {}).get("normalize") else q

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Query embeddings of texts, through the saved text query encoder.

        Args:
            texts: (nq,) query texts.

        Returns:
            (nq, dim) float32 embeddings, as the text model scores them.
        """
        return self._text_side("query", texts)

    def embed_item_texts(self, texts: list[str]) -> torch.Tensor:
        """Document embeddings of texts, through the saved text document encoder: what
        :meth:`add` takes to add documents by text.

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

    # ----------------------------------------------------------------- updates
    def add(self, items: torch.Tensor | np.ndarray, ids: Any) -> None:
        """Add items, coded with the frozen codebooks (no retraining), and publish a new version.

        The new items go to a new segment file (the update writes what it adds); re-adding an
        id removed since the last compaction, or segments grown past their share of the index,
        folds everything into a new base instead (:meth:`compact`).

        Args:
            items: (n, dim) item embeddings, as the item tower produces them (before the layer);
                normalised here for a cosine index.
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
            self.manifest.layer_config.coarse_metric,
            bulk=True,
        )
        cc = cc if cc is not None else torch.zeros(x.shape[0], dtype=torch.long)
        segment = self.index.segment_of(cc, codes, new_ids)
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

    def _raw_item_ids(self, faiss_ids: np.ndarray, keys: IdMap | None = None) -> np.ndarray:
        """The items' own ids of FAISS ids (the same array without an item map)."""
        keys = keys if keys is not None else self.item_keys
        return keys.raw(faiss_ids) if keys is not None else faiss_ids

    def _compact(self, live: IndexTensors, item_keys: IdMap | None = None) -> None:
        faiss_index = build_faiss_index(live, self.metric, self.manifest.fast_scan)  # type: ignore[arg-type]
        keys = item_keys if item_keys is not None else self.item_keys
        payloads: dict[str, Any] = {"faiss": faiss_index, "codes": live.to_dict()}
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
        before = (self.index, self._base_faiss, self.item_keys, self._engine)
        self.index = index
        if base_faiss is not None:
            self._base_faiss = base_faiss
        if item_keys is not None:
            self.item_keys = item_keys
        try:
            self._build_engine()  # a version that cannot be searched is never published
            self.manifest = write_version(self.directory, self.manifest, self.manifest, payloads, drop=drop)
        except BaseException:
            self.index, self._base_faiss, self.item_keys, self._engine = before
            raise
