"""Zero-training export of a learned Poeem index into FAISS.

The coarse centroids, PQ codebooks and rotation are copied in, ``is_trained`` is set, and the
item codes go in through FAISS's code-level API (``add_sa_codes``) exactly as the layer
computed them. Nothing on this path calls FAISS ``train()`` or re-encodes vectors.
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.export.learned import ItemsOrCodes, learned_index
from poeem.index import PoeemLayer
from poeem.search.adc import IndexTensors
from poeem.search.metric import Metric, check_metric


def is_power_of_two(n: int) -> bool:
    """Whether n is 2**b for some b >= 1."""
    return n >= 2 and n & (n - 1) == 0


def nbits_of(codebook_size: int) -> int:
    """log2(K); FAISS PQ needs K to be a power of two."""
    if not is_power_of_two(codebook_size):
        raise PoeemError(
            "codebook_size for FAISS",
            "a power of two (16, 256, 4096 ...)",
            f"K={codebook_size}",
            "retrain with K = 2**nbits, or search with poeem's torch backend",
        )
    return codebook_size.bit_length() - 1


def pack_sa_codes(
    coarse_codes: np.ndarray | None, codes: np.ndarray, coarse_code_size: int, nbits: int
) -> np.ndarray:
    """FAISS standalone codes: the list number little-endian in ``coarse_code_size`` bytes, then
    the D sub-codes packed least-significant bit first (two 4-bit codes share a byte).

    Args:
        coarse_codes: (n,) list numbers, or None for a flat PQ.
        codes: (n, D) sub-codes.

    Returns:
        (n, coarse_code_size + ceil(D * nbits / 8)) uint8.
    """
    n = codes.shape[0]
    if nbits == 8:
        pq_bytes = codes.astype(np.uint8, copy=False)
    else:
        bits = (codes.astype(np.uint64)[..., None] >> np.arange(nbits, dtype=np.uint64)) & np.uint64(1)
        pq_bytes = np.packbits(bits.reshape(n, -1).astype(np.uint8), axis=1, bitorder="little")
    if coarse_codes is None or coarse_code_size == 0:
        return np.ascontiguousarray(pq_bytes)
    lists = coarse_codes.astype("<u8").view(np.uint8).reshape(n, 8)[:, :coarse_code_size]
    return np.ascontiguousarray(np.concatenate([lists, pq_bytes], axis=1))


def _is_identity(m: torch.Tensor) -> bool:
    return bool(torch.equal(m, torch.eye(m.shape[0], dtype=m.dtype)))


def build_faiss_index(ix: IndexTensors, metric: Metric = "ip", fast_scan: bool = False) -> faiss.Index:
    """A FAISS index holding exactly the given learned index.

    IVF-PQ (``IndexIVFPQ``, by_residual) with a coarse quantizer, else ``IndexPQ`` in an
    ``IndexIDMap2``; inside an ``IndexPreTransform`` when there is a rotation (a
    ``LinearTransform`` with A = R^T) or the metric is cosine (a ``NormalizationTransform`` first).

    Args:
        ix: the learned index tensors.
        metric: "ip", "cosine" or "l2".
        fast_scan: 4-bit fast-scan variant (needs K = 16); its scores use 8-bit lookup tables,
            so they are approximate.
    """
    check_metric(metric)
    d, m, k = ix.dim, ix.codebooks.shape[0], ix.codebooks.shape[1]
    nbits = nbits_of(k)
    if fast_scan and nbits != 4:
        raise PoeemError("fast_scan", "K = 16 (4-bit codes)", f"K={k}", "export without --fast-scan")
    fmetric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    centroids = ix.codebooks.numpy().astype(np.float32).ravel()  # (D, K, dsub) flattened
    ids = ix.ids.numpy().astype(np.int64)
    if ix.coarse is not None:
        quantizer = faiss.IndexFlatL2(d) if metric == "l2" else faiss.IndexFlatIP(d)
        quantizer.add(np.ascontiguousarray(ix.coarse.numpy(), dtype=np.float32))
        inner = faiss.IndexIVFPQ(quantizer, d, ix.nlist, m, nbits, fmetric)
        faiss.copy_array_to_vector(centroids, inner.pq.centroids)
        inner.is_trained = True
        inner.precompute_table()
        packed = pack_sa_codes(ix.coarse_codes.numpy(), ix.codes.numpy(), inner.coarse_code_size(), nbits)
        inner.add_sa_codes(packed, ids)
        if fast_scan:
            inner = faiss.IndexIVFPQFastScan(inner)
    else:
        pq_index = faiss.IndexPQ(d, m, nbits, fmetric)
        faiss.copy_array_to_vector(centroids, pq_index.pq.centroids)
        pq_index.is_trained = True
        if fast_scan:
            pq_index = faiss.IndexPQFastScan(pq_index)
        inner = faiss.IndexIDMap2(pq_index)
        inner.add_sa_codes(pack_sa_codes(None, ix.codes.numpy(), 0, nbits), ids)
    transforms = []
    if metric == "cosine":
        transforms.append(faiss.NormalizationTransform(d, 2.0))
    if not _is_identity(ix.rotation):
        lt = faiss.LinearTransform(d, d, False)
        faiss.copy_array_to_vector(
            np.ascontiguousarray(ix.rotation.numpy().T, dtype=np.float32).ravel(), lt.A
        )
        faiss.copy_array_to_vector(np.zeros(d, dtype=np.float32), lt.b)
        lt.is_trained = True
        lt.have_bias = False
        transforms.append(lt)
    if not transforms:
        return inner
    index = faiss.IndexPreTransform(inner)
    for t in reversed(transforms):  # prepend_transform: the last prepended runs first
        index.prepend_transform(t)
    return index


def check_list_rule(layer: PoeemLayer, metric: str) -> None:
    """Warn when items were assigned to lists by another rule than the one search probes with."""
    if layer.coarse is None:
        return
    probe = "l2" if metric == "l2" else "ip"
    if layer.config.coarse_metric != probe:
        warnings.warn(
            f"the layer assigns items to lists by {layer.config.coarse_metric!r} but a {metric!r} "
            f"index probes lists by {probe!r}, so a query may probe lists that hold none of its "
            f"neighbours; train the layer with coarse_metric={probe!r}",
            stacklevel=3,
        )


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
        ids: (n,) int64 item ids kept by FAISS; 0..n-1 by default.
        metric: "ip", "cosine" (queries normalised by the index) or "l2".
        fast_scan: 4-bit fast-scan index (K must be 16).

    Returns:
        A ready ``faiss.Index``; ``index.search(xq, k)`` returns (D, I) with your ids.
    """
    check_list_rule(layer, metric)
    return build_faiss_index(learned_index(layer, items, ids), metric, fast_scan)
