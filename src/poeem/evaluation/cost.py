"""What a search costs: how many codes a query scans, and how unbalanced the lists are.

Comparisons at equal nprobe favour unbalanced indexes: a query routed to a big list scans more
codes. Both numbers come from the FAISS index itself, so poeem's exported index and a FAISS
baseline are measured the same way.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

from poeem.search.faiss_backend import FaissSearcher


def list_sizes(index: faiss.Index) -> np.ndarray | None:
    """(nlist,) codes per inverted list of the IVF inside ``index``, or None without IVF."""
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return None
    return np.array([ivf.invlists.list_size(i) for i in range(ivf.nlist)], dtype=np.int64)


def imbalance_factor(sizes: np.ndarray) -> float:
    """nlist * sum(size^2) / (sum size)^2: 1 for equal lists, nlist when one list holds all.

    The number FAISS's ``invlists.imbalance_factor()`` reports.
    """
    total = float(sizes.sum())
    return float(len(sizes) * np.square(sizes.astype(np.float64)).sum() / total**2) if total else 0.0


def codes_scanned(index: faiss.Index, xq: torch.Tensor, nprobe: int) -> np.ndarray:
    """(nq,) codes each query scans at ``nprobe``: the sizes of the lists it is routed to.

    Args:
        index: a FAISS index, possibly inside an ``IndexPreTransform`` (rotation, normalisation).
        xq: (nq, dim) queries as given to ``index.search``.
        nprobe: lists probed (clamped to the number of lists).

    Returns:
        (nq,) int64; every query scans all ``ntotal`` codes of an index without IVF.
    """
    sizes = list_sizes(index)
    if sizes is None:
        return np.full(xq.shape[0], index.ntotal, dtype=np.int64)
    x = np.ascontiguousarray(xq.detach().cpu().numpy(), dtype=np.float32)
    while isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = index.chain.at(i).apply(x)
        index = faiss.downcast_index(index.index)
    ivf = faiss.extract_index_ivf(index)
    _, lists = ivf.quantizer.search(x, min(nprobe, ivf.nlist))
    return np.where(lists >= 0, sizes[np.maximum(lists, 0)], 0).sum(1)


def list_balance(sizes: np.ndarray) -> dict[str, float]:
    """How evenly (nlist,) list ``sizes`` spread the items: ``largest_list`` (items in the
    largest), ``list_size_std`` and ``imbalance`` (:func:`imbalance_factor`)."""
    return {
        "largest_list": float(sizes.max()) if len(sizes) else 0.0,
        "list_size_std": float(sizes.std()) if len(sizes) else 0.0,
        "imbalance": imbalance_factor(sizes),
    }


def search_cost(searcher: object, xq: torch.Tensor, nprobe: int, num_items: int) -> dict[str, float]:
    """``codes_scanned`` (mean per query) of a search backend on queries ``xq``, and its
    :func:`list_balance` (``largest_list``, ``list_size_std``, ``imbalance``).

    Backends other than :class:`FaissSearcher` (exact search) scan every item, in one list.
    """
    if not isinstance(searcher, FaissSearcher):
        return {"codes_scanned": float(num_items), **list_balance(np.array([num_items]))}
    sizes = list_sizes(searcher.index)
    return {
        "codes_scanned": float(codes_scanned(searcher.index, xq, nprobe).mean()),
        **list_balance(sizes if sizes is not None else np.array([searcher.index.ntotal])),
    }
