"""Zero-training export of a trained layer: its learned index as tensors, and as FAISS."""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.faiss_codec import build_faiss_index
from poeem.ids import check_ids
from poeem.index import PoeemLayer
from poeem.index.tensors import IndexTensors
from poeem.metric import Metric, list_rule, prepare_queries

ItemsOrCodes = torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]


def learned_index(
    layer: PoeemLayer, items: ItemsOrCodes, ids: torch.Tensor | np.ndarray | None = None
) -> IndexTensors:
    """The learned IVF-PQ index of a trained layer, without fitting anything.

    Args:
        layer: an initialized :class:`PoeemLayer`.
        items: (n, dim) item embeddings (encoded with the layer's frozen codebooks), or the
            ``(coarse_codes, codes)`` pair that :meth:`PoeemLayer.encode` returned.
        ids: (n,) non-negative int64 item ids; 0..n-1 by default.

    Returns:
        :class:`IndexTensors` on CPU, validated (codes in range, ids non-negative and unique).
    """
    if not layer.is_initialized:
        raise PoeemError(
            "export",
            "a trained, initialized PoeemLayer",
            f"phase '{layer.phase_name}'",
            "train past the warm start or call layer.initialize(x)",
        )
    if isinstance(items, torch.Tensor):
        coarse_codes, codes = layer.encode(items)
    else:
        coarse_codes, codes = items
        if codes.dim() != 2 or codes.shape[1] != layer.config.num_subspaces:
            raise PoeemError(
                "codes",
                f"shape (n, {layer.config.num_subspaces})",
                f"shape {tuple(codes.shape)}",
                "pass codes from layer.encode()",
            )
    n = codes.shape[0]
    if coarse_codes is None:
        if layer.coarse is not None:
            raise PoeemError(
                "coarse_codes",
                f"(n,) codes for {layer.config.num_coarse} lists",
                "None",
                "pass both outputs of layer.encode()",
            )
        coarse_codes = torch.zeros(n, dtype=torch.long)
    coarse = layer.coarse.detach().cpu().float() if layer.coarse is not None else None
    return IndexTensors(
        rotation=layer.rotation_matrix.detach().cpu().float(),
        coarse=coarse,
        codebooks=layer.codebooks.detach().cpu().float(),
        coarse_codes=coarse_codes.cpu(),
        codes=codes.cpu(),
        ids=check_ids(ids, n, "item ids"),
    ).validate()


def check_list_rule(layer: PoeemLayer, metric: str) -> None:
    """Warn when items were assigned to lists by another rule than the one search probes with."""
    if layer.coarse is None:
        return
    probe = list_rule(metric)
    if layer.config.coarse_metric != probe:
        warnings.warn(
            f"the layer assigns items to lists by {layer.config.coarse_metric!r} but a {metric!r} "
            f"index probes lists by {probe!r}, so a query may probe lists that hold none of its "
            f"neighbours; train the layer with coarse_metric={probe!r}",
            stacklevel=3,
        )


def export_learned(
    layer: PoeemLayer,
    items: ItemsOrCodes,
    ids: torch.Tensor | np.ndarray | None = None,
    metric: Metric = "ip",
    fast_scan: bool = False,
) -> tuple[IndexTensors, faiss.Index]:
    """The one export chain: list-rule check, learned index tensors, FAISS index.

    Args: as :func:`to_faiss`.

    Returns:
        The learned index as tensors, and the FAISS index holding exactly those codes.
    """
    check_list_rule(layer, metric)
    if isinstance(items, torch.Tensor):  # a cosine model codes unit vectors
        items = prepare_queries(items, metric, layer.config.dim, what="items")
    tensors = learned_index(layer, items, ids)
    return tensors, build_faiss_index(tensors, metric, fast_scan)


def to_faiss(
    layer: PoeemLayer,
    items: ItemsOrCodes,
    ids: torch.Tensor | np.ndarray | None = None,
    metric: Metric = "ip",
    fast_scan: bool = False,
) -> faiss.Index:
    """Export a trained :class:`PoeemLayer` and its items into a FAISS index, with no training.

    Args:
        layer: an initialized layer.
        items: (n, dim) item embeddings (coded with the layer's frozen codebooks), or the
            ``(coarse_codes, codes)`` that :meth:`PoeemLayer.encode` returned.
        ids: (n,) non-negative int64 item ids kept by FAISS; 0..n-1 by default.
        metric: "ip", "cosine" (items normalised here, queries by the index) or "l2".
        fast_scan: 4-bit fast-scan index (K must be 16). Search it through
            :class:`poeem.search.FaissSearcher`, or pass ``D`` and ``I`` from
            :func:`poeem.search.faiss_backend.worst_results` to ``index.search``: faiss 1.15
            reads its output buffer as a threshold, and a plain call can drop rows.

    Returns:
        A ready ``faiss.Index``; ``index.search(xq, k)`` returns (D, I) with your ids.
    """
    return export_learned(layer, items, ids, metric, fast_scan)[1]
