"""FAISS as a search backend with the same interface as the torch ones, and the usual
"separately built" FAISS IVF-PQ baseline (trained on un-quantized embeddings)."""

from __future__ import annotations

import faiss
import numpy as np
import torch

from poeem.export.faiss_codec import faiss_metric, nbits_of, search_ready
from poeem.metric import Metric, check_metric, check_search_args, prepare_queries, worst_score


def search_parameters(
    index: faiss.Index, nprobe: int, selector: faiss.IDSelector | None = None
) -> list[faiss.SearchParameters]:
    """Per-call parameters probing ``nprobe`` lists (clamped) of the IVF inside ``index``, and
    keeping only the ids ``selector`` accepts (all when None).

    Nothing is set on the index itself, so concurrent searches with different nprobe are safe.
    Returns the parameter objects outermost first (keep them all alive during the search);
    an empty list when there is nothing to set.
    """
    try:
        ivf = faiss.extract_index_ivf(index)
        inner = faiss.SearchParametersIVF(nprobe=max(1, min(nprobe, ivf.nlist)))
    except RuntimeError:  # no IVF
        if selector is None:
            return []
        inner = faiss.SearchParameters()
    if selector is not None:
        inner.sel = selector
    chain = [inner]
    while isinstance(index, faiss.IndexPreTransform):
        outer = faiss.SearchParametersPreTransform()
        outer.index_params = chain[0]
        chain.insert(0, outer)
        index = faiss.downcast_index(index.index)
    return chain


class FaissSearcher:
    """``search(xq, k, nprobe) -> (D, I)`` on a FAISS index, in torch tensors.

    Queries are validated (and normalised for cosine when the index does not do it itself);
    with a ``selector`` only the ids it accepts are searched. The index gets poeem's one set of
    search settings (:func:`poeem.export.faiss_codec.search_ready`), wherever it came from.
    """

    def __init__(
        self, index: faiss.Index, normalize_queries: bool = False, selector: faiss.IDSelector | None = None
    ) -> None:
        self.index, self.normalize, self.selector = search_ready(index), normalize_queries, selector

    @property
    def ntotal(self) -> int:
        """Number of items."""
        return int(self.index.ntotal)

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: xq (nq, dim). Returns D (nq, k) float32 scores and I (nq, k) int64 ids."""
        check_search_args(k, nprobe)
        metric = "cosine" if self.normalize else "ip"
        q = prepare_queries(xq, metric, self.index.d).cpu().numpy()
        params = search_parameters(self.index, nprobe, self.selector)
        d, i = worst_results(len(q), k, self.index.metric_type)
        self.index.search(
            np.ascontiguousarray(q, dtype=np.float32), k, params=params[0] if params else None, D=d, I=i
        )
        return torch.from_numpy(d), torch.from_numpy(i)


def worst_results(nq: int, k: int, metric_type: int) -> tuple[np.ndarray, np.ndarray]:
    """Output buffers for ``index.search``, filled with the metric's worst score and id -1.

    FAISS's fast-scan heap (faiss 1.15, k <= 20) reads the caller's first output distance as a
    starting threshold. Python's default output is uninitialised memory: when it happens to
    hold FLT_MAX, the search keeps nothing and returns only -1 ids. Pre-filled buffers make
    every search start from the neutral threshold (an infinite worst score is neither).

    Returns:
        D (nq, k) float32 and I (nq, k) int64.
    """
    worst = worst_score("l2" if metric_type == faiss.METRIC_L2 else "ip")
    return np.full((nq, k), worst, np.float32), np.full((nq, k), -1, np.int64)


def train_faiss_ivfpq(
    xb: torch.Tensor,
    num_coarse: int,
    num_subspaces: int,
    codebook_size: int,
    metric: Metric = "ip",
    opq: bool = False,
    seed: int = 0,
) -> faiss.Index:
    """The usual pipeline's index: FAISS trains IVF{coarse_K},PQ{D}x{nbits} (optionally OPQ) on
    the item embeddings, then adds them. Ids are row numbers.

    Args:
        xb: (n, dim) un-quantized item embeddings (normalised here for cosine).
    """
    check_metric(metric)
    x = prepare_queries(xb, metric, xb.shape[1]).cpu().numpy()
    index = untrained_faiss_index(
        x.shape[1], ivfpq_spec(num_coarse, num_subspaces, codebook_size, opq), metric, seed
    )
    index.train(x)
    index.add(x)
    return index


def ivfpq_spec(num_coarse: int, num_subspaces: int, codebook_size: int, opq: bool = False) -> str:
    """``index_factory`` words of the baseline: "[OPQ{D},][IVF{coarse_K},]PQ{D}x{nbits}"."""
    opq_part = f"OPQ{num_subspaces}," if opq else ""
    ivf_part = f"IVF{num_coarse}," if num_coarse else ""
    return f"{opq_part}{ivf_part}PQ{num_subspaces}x{nbits_of(codebook_size)}"


def untrained_faiss_index(dim: int, spec: str, metric: Metric = "ip", seed: int = 0) -> faiss.Index:
    """``faiss.index_factory(dim, spec)`` set up to train as a baseline should: quiet, its
    k-means seeded, and without polysemous training. The factory turns that on for 8-bit PQ; it
    only reorders each codebook for Hamming pre-filtering, which search never uses here
    (``polysemous_ht`` 0), and costs about a second per subquantizer whatever the data size."""
    index = faiss.index_factory(dim, spec, faiss_metric(metric))
    faiss.ParameterSpace().set_index_parameter(index, "verbose", 0)
    try:
        owner = faiss.downcast_index(faiss.extract_index_ivf(index))
        owner.cp.seed = seed
    except RuntimeError:  # no IVF
        owner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    if hasattr(owner, "do_polysemous_training"):
        owner.do_polysemous_training = False
    for quantizer in ("pq", "rq"):
        if hasattr(owner, quantizer):
            getattr(owner, quantizer).cp.seed = seed
    return index
