"""Write a trained layer and its items as an index directory (no training): the FAISS index, the
codes as tensors, and what searching by query id or text needs (see :mod:`poeem.export.index_dir`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.faiss_codec import default_fast_scan
from poeem.export.index_dir import Manifest, write_version
from poeem.export.item_vectors import VECTORS_ROLE, Precision, VectorCodec, check_precision
from poeem.export.learned import ItemsOrCodes, export_learned
from poeem.ids import IdMap
from poeem.index import PoeemLayer
from poeem.metric import Metric, prepare_queries
from poeem.model.towers import Tower

TextSide = tuple[dict[str, Any], dict[str, torch.Tensor]]


def write_index(
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
    text_query: TextSide | None = None,
    replace: bool = False,
    text_item: TextSide | None = None,
    rerank: Precision | None = None,
    vectors: torch.Tensor | np.ndarray | None = None,
) -> None:
    """Export a trained layer and its items into a new index directory.

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
        rerank: keep each item's vector beside its codes at this precision ("float", "fp16" or
            "sq8", :mod:`poeem.export.item_vectors`) to re-rank search candidates; None: codes only.
        vectors: with ``rerank``: (n, dim) the items' embeddings, when ``items`` are codes
            (default: ``items`` themselves); normalised here for a cosine index.
    """
    item_keys = None
    if ids is not None and np.asarray(ids).dtype.kind in "UO":
        item_keys = IdMap(np.asarray(ids))
        ids = np.arange(len(item_keys))
    if fast_scan is None:
        fast_scan = default_fast_scan(layer.config)
    tensors, index = export_learned(layer, items, ids, metric, fast_scan)
    extra: dict[str, Any] = {}
    codec = None
    if rerank is not None:
        codec, stored = item_vectors(rerank, items, vectors, metric, tensors.ntotal, layer.config.dim)
        extra[VECTORS_ROLE] = {"vectors": stored}
    elif vectors is not None:
        raise PoeemError("vectors", "vectors only with rerank", "vectors without rerank", "pass rerank too")
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
    tower_config = None if query_tower is None else {**query_tower.config(), "normalize": normalize_queries}
    manifest = Manifest(
        metric=metric,
        dim=layer.config.dim,
        layer=layer.config.to_dict(),
        fast_scan=fast_scan,
        query_tower=tower_config,
        text_query=text_query[0] if text_query is not None else None,
        text_item=text_item[0] if text_item is not None else None,
        rerank=codec.to_manifest() if codec is not None else None,
    )
    payloads = {"faiss": index, "codes": tensors.to_dict(), **extra}
    write_version(Path(directory), None, manifest, payloads, replace=replace)


def item_vectors(
    rerank: str,
    items: ItemsOrCodes,
    vectors: torch.Tensor | np.ndarray | None,
    metric: Metric,
    n: int,
    dim: int,
) -> tuple[VectorCodec, torch.Tensor]:
    """The codec (trained on the items) and the (n, dim) stored rows of the vectors an export
    keeps to re-rank: ``vectors``, or ``items`` when they are embeddings."""
    check_precision(rerank)
    if vectors is None:
        if not isinstance(items, torch.Tensor):
            raise PoeemError(
                "rerank",
                "the items' embeddings to keep",
                "codes only",
                "pass vectors=(n, dim) embeddings with the codes",
            )
        vectors = items
    x = prepare_queries(vectors, metric, dim, what="item vectors")  # cosine: unit vectors, as coded
    if x.shape[0] != n:
        raise PoeemError("item vectors", f"one per item ({n})", f"{x.shape[0]} rows", "align them")
    codec = VectorCodec.fit(rerank, x)
    return codec, codec.encode(x)
