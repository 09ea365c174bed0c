"""Peer indexes of the quality benchmarks, behind the ``search(queries, k, nprobe)`` interface of
poeem's own searchers.

ScaNN (``scann`` on PyPI, numpy API): a k-means tree with ``coarse_K`` leaves (none when
coarse_K is 0) and anisotropic-hashing (AH) codes, ``dims_per_block = dim / D`` dimensions per
code, one byte per block for K = 256 (``lut256``) and half a byte for K = 16 (``lut16``): the
same bytes per item as IVF-PQ with D sub-codes of K words. No ``.reorder()``: that keeps the
float vectors, and the comparison would no longer be at equal bytes.

ScaNN does not expose its leaves' sizes; :meth:`ScannIndex.codes_scanned` counts them by asking
for every candidate of the probed leaves (the rest of the answer is padded with NaN scores).

FAISS RQ (:func:`faiss_residual_index`): FAISS's own IVF k-means lists with a residual quantizer
in place of PQ: D stages of K codewords, each over the whole residual left by the stages before
(not over a slice of it), encoded by FAISS's beam search (its default beam of 5). Inner-product
scores come from look-up tables without a stored norm, so it is D * log2(K) / 8 bytes per item,
as IVF-PQ.

Exact within lists (:func:`exact_within_lists`): a FAISS index's own lists with exact scores
inside them, the ceiling that any code in those lists can reach at a given nprobe (for poeem's
learned indexes, :func:`poeem.export.faiss_codec.build_float_lists_index` does the same).
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np
import torch

from poeem.evaluation.cost import search_cost
from poeem.export.faiss_codec import nbits_of
from poeem.search import FaissSearcher
from poeem.search.faiss_backend import untrained_faiss_index


class ScannIndex:
    """ScaNN tree + AH over ``items`` (n, dim), searched by inner product."""

    def __init__(self, items: torch.Tensor, num_coarse: int, num_subspaces: int, codebook_size: int) -> None:
        import scann

        db = np.ascontiguousarray(items.float().numpy())
        n, dim = db.shape
        if dim % num_subspaces or codebook_size not in (16, 256):
            shape = f"dim {dim}, D {num_subspaces}, K {codebook_size}"
            raise ValueError(f"ScaNN AH needs dim % D == 0 and K 16 or 256, got {shape}")
        builder = scann.scann_ops_pybind.builder(db, 10, "dot_product")
        if num_coarse:
            builder = builder.tree(num_leaves=num_coarse, num_leaves_to_search=1, training_sample_size=n)
        self.searcher = builder.score_ah(
            dim // num_subspaces,
            anisotropic_quantization_threshold=0.2,
            hash_type="lut256" if codebook_size == 256 else "lut16",
            training_sample_size=n,
        ).build()
        self.tree = bool(num_coarse)
        self.ntotal = n

    def search(self, queries: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dim) queries -> (B, k) scores and (B, k) int64 item rows, ``nprobe`` leaves searched."""
        q = np.ascontiguousarray(queries.float().numpy())
        extra: dict[str, Any] = {"leaves_to_search": nprobe} if self.tree else {}
        ids, scores = self.searcher.search_batched(q, final_num_neighbors=k, **extra)
        return torch.from_numpy(np.asarray(scores, dtype=np.float32)), torch.from_numpy(ids.astype(np.int64))

    def codes_scanned(self, queries: torch.Tensor, nprobe: int = 1, batch: int = 256) -> np.ndarray:
        """(B,) codes each of the (B, dim) queries scans with ``nprobe`` leaves: the candidates
        ScaNN scores when asked for all of them (no reorder, so every one is a scored code)."""
        if not self.tree:
            return np.full(queries.shape[0], self.ntotal, dtype=np.int64)
        q = np.ascontiguousarray(queries.float().numpy())
        counts = []
        for start in range(0, len(q), batch):
            _, scores = self.searcher.search_batched(
                q[start : start + batch],
                final_num_neighbors=self.ntotal,
                leaves_to_search=nprobe,
                pre_reorder_num_neighbors=self.ntotal,
            )
            counts.append((~np.isnan(np.asarray(scores))).sum(1))
        return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def faiss_residual_index(
    items: torch.Tensor, num_coarse: int, num_subspaces: int, codebook_size: int, seed: int = 0
) -> FaissSearcher:
    """FAISS IVF{coarse_K},RQ{D}x{log2 K} trained on and filled with ``items`` (n, dim), searched
    by inner product; ids are row numbers. Same bytes per item as IVF-PQ at (D, K)."""
    db = np.ascontiguousarray(items.float().numpy())
    ivf_part = f"IVF{num_coarse}," if num_coarse else ""
    index = untrained_faiss_index(
        db.shape[1], f"{ivf_part}RQ{num_subspaces}x{nbits_of(codebook_size)}", "ip", seed
    )
    index.train(db)
    index.add(db)
    return FaissSearcher(index)


def codes_scanned(index: Any, queries: torch.Tensor, nprobe: int) -> float:
    """Mean codes each of the (B, dim) ``queries`` scans at ``nprobe``: ScaNN's probed leaves,
    FAISS's list sizes on each query's real routing, every item for exact search."""
    if isinstance(index, ScannIndex):
        return float(index.codes_scanned(queries, nprobe).mean())
    return search_cost(index, queries, nprobe, index.ntotal)["codes_scanned"]


def exact_within_lists(index: Any, items: torch.Tensor) -> FaissSearcher:
    """The lists of a FAISS IVF ``index`` (a :class:`FaissSearcher` or ``faiss.Index``, no
    rotation in front of its IVF) filled with the (n, dim) ``items`` as floats, searched by inner
    product: the recall of a perfect code at each nprobe, with the same routing."""
    inner = index.index if isinstance(index, FaissSearcher) else index
    ivf = faiss.extract_index_ivf(inner)
    if ivf.d != inner.d or not isinstance(faiss.downcast_index(inner), faiss.IndexIVF):
        raise ValueError("exact_within_lists needs an IVF index with no transform in front of it")
    quantizer = faiss.clone_index(ivf.quantizer)
    flat = faiss.IndexIVFFlat(quantizer, ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    flat.own_fields = True  # the index frees its copy of the quantizer, not Python
    quantizer.this.disown()
    flat.add(np.ascontiguousarray(items.float().numpy()))
    return FaissSearcher(flat)
