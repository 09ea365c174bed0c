"""The comparison table of a trained model: exact search, the learned index, and FAISS."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from poeem.data.interactions import InteractionData
from poeem.evaluation.cost import search_cost
from poeem.evaluation.evaluate import Searchable, evaluate_retrieval
from poeem.export.faiss_codec import (
    build_faiss_index,
    build_float_lists_index,
    default_fast_scan,
    factory_string,
)
from poeem.export.item_codes import EXPORT_DEFAULT, encode_reusing
from poeem.export.learned import learned_index
from poeem.metric import prepare_queries
from poeem.model import RetrievalModel
from poeem.model.query_encoder import QueryEncoder
from poeem.search.exact import FlatIndex
from poeem.search.faiss_backend import FaissSearcher, ivfpq_spec, train_faiss_ivfpq


def _rows(
    name: str,
    described: str,
    index: Searchable,
    build_s: float,
    model: RetrievalModel,
    data: InteractionData,
    ks: tuple[int, ...],
    nprobes: tuple[int, ...],
) -> list[dict[str, Any]]:
    """One row per nprobe of ``index``, named ``name``; ``described``: the index scored, in
    FAISS's factory words."""
    out = []
    encode = QueryEncoder.from_model(model, data).by_rows
    for nprobe in nprobes:
        started = time.perf_counter()
        metrics = evaluate_retrieval(index, encode, data, ks, nprobe)
        eval_s = time.perf_counter() - started
        out.append(
            {
                "method": name,
                "index": described,
                "nprobe": nprobe,
                **metrics,
                **_mean_cost(index, encode, data, nprobe),
                "build_s": build_s,
                "eval_s": eval_s,
            }
        )
    return out


def _mean_cost(
    index: Searchable, encode: Callable[[np.ndarray], torch.Tensor], data: InteractionData, nprobe: int
) -> dict[str, float]:
    """``codes_scanned`` averaged over the evaluation queries (in batches), and the index's list
    balance (:func:`poeem.evaluation.cost.list_balance`)."""
    rows_all = data.eval_queries()
    total, cost = 0.0, {}
    for start in range(0, len(rows_all), 65536):
        rows = rows_all[start : start + 65536]
        cost = search_cost(index, encode(rows), nprobe, data.num_items)
        total += cost["codes_scanned"] * len(rows)
    return {**cost, "codes_scanned": total / max(1, len(rows_all))}


@torch.no_grad()
def compare_indexes(
    model: RetrievalModel,
    data: InteractionData,
    ks: tuple[int, ...],
    nprobes: tuple[int, ...],
    faiss_baseline: bool = True,
    budget: tuple[int, int, int] = (8, 8, 256),
    opq_baseline: bool = False,
    seed: int = 0,
    lists_ceiling: bool = False,
) -> list[dict[str, Any]]:
    """Metric rows for: ``exact`` (un-quantized items, brute force); ``poeem`` (the learned
    index exported to FAISS without training, as ``poeem export`` writes it, when the model has
    a layer); ``faiss-ivfpq``
    (FAISS trained on the un-quantized items with ``budget`` = (coarse_K, D, K)); and
    optionally ``faiss-opq-ivfpq``, and with ``lists_ceiling`` ``poeem-lists-flat``: the learned
    index's lists holding the float item vectors (see
    :func:`poeem.export.faiss_codec.build_float_lists_index`), what a perfect code would reach.

    Each row holds the metrics, ``nprobe``, ``codes_scanned`` (mean codes a query scans at that
    nprobe, from its real routing), ``imbalance`` (FAISS's list imbalance factor), ``build_s``
    (index build time: FAISS train+add, or encoding with the frozen learned index) and ``eval_s``.
    """
    model.eval()
    item_features = torch.from_numpy(data.item_features) if data.item_features is not None else None
    xb = model.all_item_embeddings(item_features).cpu()
    rows = _rows("exact", "Flat", FlatIndex(xb, "ip"), 0.0, model, data, ks, (1,))
    rows += learned_index_rows(model, data, xb, ks, nprobes, lists_ceiling=lists_ceiling)
    if lists_ceiling and not any(row["method"] == "poeem-lists-flat" for row in rows):
        warnings.warn("no lists-ceiling rows: the model has no trained index with IVF lists", stacklevel=2)
    baselines = [("faiss-ivfpq", False)] * faiss_baseline + [("faiss-opq-ivfpq", True)] * opq_baseline
    if baselines and xb.shape[0] < max(budget[0], budget[2]):
        warnings.warn(
            f"no FAISS baseline: {xb.shape[0]} items are too few to train IVF{budget[0]},PQ{budget[1]} "
            f"with {budget[2]} codewords per subspace",
            stacklevel=2,
        )
        baselines = []
    for name, opq in baselines:
        started = time.perf_counter()
        index = train_faiss_ivfpq(xb, *budget, metric="ip", opq=opq, seed=seed)
        build_s = time.perf_counter() - started
        described = ivfpq_spec(*budget, opq=opq)
        rows += _rows(name, described, FaissSearcher(index), build_s, model, data, ks, nprobes)
    return rows


@torch.no_grad()
def learned_index_rows(
    model: RetrievalModel,
    data: InteractionData,
    xb: torch.Tensor,
    ks: tuple[int, ...],
    nprobes: tuple[int, ...],
    method: str = "poeem",
    lists_ceiling: bool = False,
) -> list[dict[str, Any]]:
    """Metric rows (as :func:`compare_indexes` makes them) of the model's learned index exported
    to FAISS without training, as ``poeem export`` writes it by default (4-bit PQ codes as fast
    scan, :func:`~poeem.export.faiss_codec.default_fast_scan`), named ``method``; with
    ``lists_ceiling`` also ``poeem-lists-flat``; no rows without a layer or in its warm start.
    Each row's ``index`` names the FAISS index it scored, e.g. "IVF64,PQ16x4fs".

    Args:
        xb: (num_items, dim) the model's item embeddings, in eval mode.
    """
    if model.index is None or not model.index.is_initialized:  # no layer, or in its warm start
        return []
    started = time.perf_counter()
    rows_all, metric = torch.arange(xb.shape[0]), model.config.search_metric
    codes = encode_reusing(  # what `poeem export` writes, served as users serve it
        model.index,
        rows_all,
        lambda r: prepare_queries(xb[r], metric, xb.shape[1], "items"),
        EXPORT_DEFAULT,
    )
    learned = learned_index(model.index, codes)
    fast_scan = default_fast_scan(model.index.config)
    searcher = FaissSearcher(build_faiss_index(learned, "ip", fast_scan))
    described = factory_string(learned, fast_scan)
    rows = _rows(method, described, searcher, time.perf_counter() - started, model, data, ks, nprobes)
    if lists_ceiling and learned.coarse is not None:
        started = time.perf_counter()
        items = prepare_queries(xb, metric, xb.shape[1], "items")
        flat = FaissSearcher(build_float_lists_index(learned, items, "ip"))
        build_s = time.perf_counter() - started
        rows += _rows("poeem-lists-flat", f"IVF{learned.nlist},Flat", flat, build_s, model, data, ks, nprobes)
    return rows
