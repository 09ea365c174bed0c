"""Peer indexes of the quality benchmarks, behind the ``search(queries, k, nprobe)`` interface of
poeem's own searchers.

ScaNN (``scann`` on PyPI, numpy API): a k-means tree with ``coarse_K`` leaves (none when
coarse_K is 0) and anisotropic-hashing (AH) codes, ``dims_per_block = dim / D`` dimensions per
code, one byte per block for K = 256 (``lut256``) and half a byte for K = 16 (``lut16``): the
same bytes per item as IVF-PQ with D sub-codes of K words. No ``.reorder()``: that keeps the
float vectors, and the comparison would no longer be at equal bytes.

With ``reorder`` ("int8" or "bfloat16"), ScaNN keeps each item's vector at that precision and
re-scores the top ``F k`` AH candidates with it (``pre_reorder_num_neighbors``): the re-ranking
peer of the frontier's re-ranking group, at D plus dim (int8) or 2 dim (bfloat16) bytes.
:class:`RefinedFaiss` is FAISS's counterpart, a factory string ending in ``Refine(SQ8)`` or
``Refine(SQfp16)`` searched with ``k_factor`` F.

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

import math
from typing import Any

import faiss
import numpy as np
import torch

from poeem.evaluation.cost import search_cost
from poeem.export.faiss_codec import nbits_of
from poeem.search import FaissSearcher
from poeem.search.faiss_backend import untrained_faiss_index, worst_results


class ScannIndex:
    """ScaNN tree + AH over ``items`` (n, dim), searched by inner product."""

    def __init__(
        self,
        items: torch.Tensor,
        num_coarse: int,
        num_subspaces: int,
        codebook_size: int,
        reorder: str | None = None,
        max_candidates: int = 1000,
    ) -> None:
        import scann
        from scann.scann_ops.py.scann_builder import ReorderType

        db = np.ascontiguousarray(items.float().numpy())
        n, dim = db.shape
        if dim % num_subspaces or codebook_size not in (16, 256):
            shape = f"dim {dim}, D {num_subspaces}, K {codebook_size}"
            raise ValueError(f"ScaNN AH needs dim % D == 0 and K 16 or 256, got {shape}")
        builder = scann.scann_ops_pybind.builder(db, 10, "dot_product")
        if num_coarse:
            builder = builder.tree(num_leaves=num_coarse, num_leaves_to_search=1, training_sample_size=n)
        scored = builder.score_ah(
            dim // num_subspaces,
            anisotropic_quantization_threshold=0.2,
            hash_type="lut256" if codebook_size == 256 else "lut16",
            training_sample_size=n,
        )
        if reorder is not None:
            quantize = {"int8": ReorderType.INT8, "bfloat16": ReorderType.BFLOAT16}[reorder]
            scored = scored.reorder(max_candidates, quantize=quantize)
        self.searcher = scored.build()
        self.reorders = reorder is not None
        self.tree = bool(num_coarse)
        self.ntotal = n

    def search(
        self, queries: torch.Tensor, k: int, nprobe: int | tuple[int, float] = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, dim) queries -> (B, k) scores and (B, k) int64 item rows, ``nprobe`` leaves
        searched; with reorder, ``nprobe`` is (leaves, F) and the top ceil(F k) are re-scored."""
        q = np.ascontiguousarray(queries.float().numpy())
        leaves, factor = nprobe if isinstance(nprobe, tuple) else (nprobe, 1.0)
        extra: dict[str, Any] = {"leaves_to_search": leaves} if self.tree else {}
        if self.reorders:
            extra["pre_reorder_num_neighbors"] = max(k, math.ceil(factor * k))
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


class RefinedFaiss:
    """A FAISS index from a factory string ending in ``Refine(SQ8)`` (or ``Refine(SQfp16)``,
    ``RFlat``), trained on and filled with the (n, dim) ``items``, searched by inner product:
    ``search(xq, k, (nprobe, F))`` takes the base index's top F k and re-scores them with the
    refine index (``k_factor`` F); F = 1 is the base index alone."""

    def __init__(self, items: np.ndarray, spec: str, seed: int) -> None:
        self.index = untrained_faiss_index(items.shape[1], spec, "ip", seed)
        self.index.train(items)
        self.index.add(items)
        self.ntotal = self.index.ntotal
        self.nlist = faiss.extract_index_ivf(self.index).nlist

    def search(
        self, xq: torch.Tensor, k: int, setting: tuple[int, float] = (1, 1.0)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(nq, dim) queries -> (nq, k) scores and ids, probing ``setting[0]`` lists and
        re-scoring ``setting[1]`` times k candidates."""
        nprobe, factor = setting
        params = faiss.SearchParametersIVF(nprobe=max(1, min(nprobe, self.nlist)))
        if isinstance(self.index, faiss.IndexRefine):
            params = faiss.IndexRefineSearchParameters(k_factor=float(factor), base_index_params=params)
        q = np.ascontiguousarray(xq.float().numpy())
        d, i = worst_results(len(q), k, self.index.metric_type)
        self.index.search(q, k, params=params, D=d, I=i)
        return torch.from_numpy(d), torch.from_numpy(i)
