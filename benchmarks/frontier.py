"""Recall against queries per second at equal bytes: every index as its users judge it.

For each seed it trains the baseline two-tower model (no layer) and builds the peers on its item
embeddings, all at the same bytes per item (D) and the same number of lists (FAISS's guideline
of 4 sqrt(n), rounded to a power of two):

- faiss-ivfpq: ``IVF{L},PQ{D}x8``;
- faiss-ivfpq-fastscan: ``IVF{L},PQ{2D}x4fs`` (4-bit codes, twice the sub-codes);
- faiss-opq-ivfpq: ``OPQ{D},IVF{L},PQ{D}x8``;
- faiss-ivfrq: ``IVF{L},RQ{D}x8``;
- scann-lut256 and scann-lut16: ScaNN tree + AH, no reorder (peers.py);
- exact and hnsw (``HNSW32,Flat``) as references, at the bytes they take.

It trains the same model with a Poeem layer: at K = 16 (2D sub-codes), exported as fast scan
(``poeem``: what ``poeem train`` and ``poeem export`` serve with no index flags; for text towers
that is an index fitted after training, D 8-bit codes, and distilled), and the same distilled
after training (``poeem-distilled``, ``--distill-epochs 10``); and at K = 256 (D sub-codes),
served as trained (``poeem-k256``) and refitted (``poeem-refit``, ``--refit rq``: both come from
one run, which keeps its index as trained), trained with the model for text towers too.
``poeem-distill-items`` is ``poeem distill --items --queries`` with its defaults on the
baseline's item embeddings, taught by the training queries' embeddings (the queries a run
distils from; the evaluation queries never teach an index): poeem's index for embeddings it did
not train. A fit, a refit and a distillation after training are part of a run's build.

Each method is searched at every nprobe from 1 to all lists (HNSW: efSearch 16 to 512), up to
the first setting that is slower than exact search and takes over 2 s for the query set: exact
search, as fast and exact, dominates every slower point, and measuring them could take hours
(FAISS's IVF-RQ at 1,024 lists takes 70x IVF-PQ's time per query).
``qps`` is the whole evaluation query set searched at once on 1 thread, best of 3, search only;
``recall`` is the headline metric (training items excluded, as every benchmark here).
``build_s`` is everything the index needs after training: FAISS's train + add, ScaNN's build,
a Poeem export, and a refit and distillation where the run does them.

    python benchmarks/frontier.py --dataset ml-100k --seeds 0 1 2
    python benchmarks/frontier.py --dataset gowalla --seeds 0
    python benchmarks/frontier.py --dataset gowalla --seeds 0 --num-subspaces 16
    python benchmarks/frontier.py --dataset scifact --seeds 0 --num-subspaces 16

Writes ``results/frontier_<dataset>[_D<bytes>].json``; ``benchmarks/report.py`` plots it.

``--rerank`` measures the re-ranking group instead, at its own bytes per item (codes plus the
kept vectors): poeem's default index exported with ``--rerank sq8`` (and ``fp16``), searched
with ``rerank=F``; FAISS IVF-PQ and IVF-PQ fast scan with ``Refine(SQ8)`` (and
``Refine(SQfp16)``), searched with ``k_factor`` F; ScaNN lut16 with int8 (and bfloat16)
reorder of the top F k; and, as references at the codes' bytes alone, poeem's default and FAISS
IVF-PQ without re-ranking. It sweeps nprobe (up to ``--rerank-max-nprobe``) times F
(``--rerank-factors``) and writes ``results/frontier_rerank_<dataset>[_D<bytes>].json``:

    python benchmarks/frontier.py --dataset gowalla --seeds 0 --rerank
    python benchmarks/frontier.py --dataset scifact --seeds 0 --num-subspaces 16 --rerank
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from poeem.data import load_data
from poeem.evaluation.cost import list_balance, list_sizes
from poeem.evaluation.evaluate import evaluate_retrieval
from poeem.evaluation.metrics import ranking_metric_sums
from poeem.export.faiss_codec import build_faiss_index, default_fast_scan
from poeem.export.learned import export_learned
from poeem.model.query_encoder import QueryEncoder
from poeem.pipeline.distill import distill_embeddings
from poeem.pipeline.recipe import DEFAULT_DISTILL_EPOCHS
from poeem.pipeline.run import after_training_seconds, attach_data, train_run
from poeem.pipeline.run_dir import load_run
from poeem.search import FaissSearcher, Searcher
from poeem.search.faiss_backend import untrained_faiss_index
from poeem.training.distill import DistillConfig

from common import RESULTS, add_mean_std, command_line, pareto_front, save_result
from peers import RefinedFaiss, ScannIndex
from presets import Preset, preset, tiny

HNSW_EF = (16, 32, 64, 128, 256, 512)
# a timing repeats for at least least_s (small query sets time noisily); a method's sweep stops at
# its first setting slower than exact search (off in the smoke configuration, to test every setting)
QPS_SECONDS = {"least_s": 0.5, "stop_below_exact": 1.0}
SLOW_PASS_S = 2.0  # ... when a pass over the query set also takes this long
METHODS = [  # plotting and table order
    "poeem",
    "poeem-distilled",
    "poeem-k256",
    "poeem-refit",
    "poeem-distill-items",
    "faiss-ivfpq",
    "faiss-ivfpq-fastscan",
    "faiss-opq-ivfpq",
    "faiss-ivfrq",
    "scann-lut256",
    "scann-lut16",
    "hnsw",
]
DEFAULT_METHOD = "poeem"  # what `poeem train` serves with no index flags
# the re-ranking group: method -> vector bytes per dimension kept beside the codes (0: none)
RERANK_METHODS = {
    "poeem-rerank-sq8": 1,
    "poeem-rerank-fp16": 2,
    "faiss-ivfpq-refine-sq8": 1,
    "faiss-ivfpq-fastscan-refine-sq8": 1,
    "faiss-ivfpq-fastscan-refine-fp16": 2,
    "scann-lut16-reorder-int8": 1,
    "scann-lut16-reorder-bf16": 2,
    "poeem": 0,
    "faiss-ivfpq": 0,
}
RERANK_DEFAULT = "poeem-rerank-sq8"  # the row the report compares (poeem export --rerank sq8)


def guideline_lists(num_items: int) -> int:
    """FAISS's guideline of 4-16 sqrt(n) lists, at its low end, as a power of two."""
    return 2 ** round(math.log2(4 * math.sqrt(num_items)))


class HnswSearcher:
    """FAISS ``HNSW32,Flat`` by inner product; ``nprobe`` is its efSearch."""

    def __init__(self, items: np.ndarray) -> None:
        self.index = faiss.index_factory(items.shape[1], "HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
        self.index.add(items)
        self.ntotal = self.index.ntotal

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """(nq, dim) queries -> (nq, k) scores and ids, with efSearch ``nprobe``."""
        params = faiss.SearchParametersHNSW(efSearch=max(nprobe, k))
        d, i = self.index.search(np.ascontiguousarray(xq.float().numpy()), k, params=params)
        return torch.from_numpy(d), torch.from_numpy(i)


@contextmanager
def one_thread() -> Iterator[None]:
    """FAISS and torch on one thread inside the block."""
    threads = torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(threads)
        torch.set_num_threads(threads)


def best_qps(index: Any, xq: torch.Tensor, k: int, setting: int, repeats: int = 3) -> float:
    """Queries per second of ``index.search`` over all (nq, dim) ``xq`` at once: the best of
    ``repeats`` passes (fewer once they took 3 s: slow passes time steadily), and of as many
    more as fit in ``QPS_SECONDS["least_s"]``."""
    least_s = QPS_SECONDS["least_s"]
    with one_thread():
        best, spent, passes = math.inf, 0.0, 0
        while passes < 1 or (passes < repeats and spent < 3.0) or spent < least_s:
            started = time.perf_counter()
            index.search(xq, k, setting)
            elapsed = time.perf_counter() - started
            best, spent, passes = min(best, elapsed), spent + elapsed, passes + 1
    return xq.shape[0] / best


def remembered(encode: Callable[[np.ndarray], torch.Tensor]) -> Callable[[np.ndarray], torch.Tensor]:
    """``encode`` that embeds each set of query rows once (a text tower re-encoding the queries
    at every search setting would take most of a text benchmark's time)."""
    seen: dict[bytes, torch.Tensor] = {}

    def encode_once(rows: np.ndarray) -> torch.Tensor:
        key = np.asarray(rows).tobytes()
        if key not in seen:
            with torch.no_grad():
                seen[key] = encode(rows)
        return seen[key]

    return encode_once


def timed(build: Callable[[], Any]) -> tuple[Any, float]:
    """``build()`` and the seconds it took."""
    started = time.perf_counter()
    out = build()
    return out, time.perf_counter() - started


def faiss_peer(items: np.ndarray, spec: str, seed: int) -> FaissSearcher:
    """A FAISS index from ``spec``, trained on and filled with the (n, dim) ``items``."""
    index = untrained_faiss_index(items.shape[1], spec, "ip", seed)
    index.train(items)
    index.add(items)
    return FaissSearcher(index)


Built = tuple[Any, float, float, list[int]]  # index, build seconds, bytes per item, search settings


def peers(
    items: torch.Tensor, lists: int, d: int, seed: int, methods: list[str]
) -> Iterator[tuple[str, Built]]:
    """Each of ``methods``' peers built on the (n, dim) ``items``, one at a time."""
    x = np.ascontiguousarray(items.float().numpy())
    nprobes = [2**i for i in range(lists.bit_length())]
    specs = {
        "faiss-ivfpq": f"IVF{lists},PQ{d}x8",
        "faiss-ivfpq-fastscan": f"IVF{lists},PQ{2 * d}x4fs",
        "faiss-opq-ivfpq": f"OPQ{d},IVF{lists},PQ{d}x8",
        "faiss-ivfrq": f"IVF{lists},RQ{d}x8",
    }
    scann = {"scann-lut256": (d, 256), "scann-lut16": (2 * d, 16)}
    for name in methods:
        if name in specs:
            index, seconds = timed(lambda spec=specs[name]: faiss_peer(x, spec, seed))
            yield name, (index, seconds, float(d), nprobes)
        elif name in scann:
            subspaces, k = scann[name]
            index, seconds = timed(lambda s=subspaces, k=k: ScannIndex(items, lists, s, k))
            yield name, (index, seconds, float(d), nprobes)
        elif name == "hnsw":
            hnsw, seconds = timed(lambda: HnswSearcher(x))
            yield name, (hnsw, seconds, len(faiss.serialize_index(hnsw.index)) / x.shape[0], list(HNSW_EF))


def poeem_searcher(model: Any, data: Any) -> tuple[FaissSearcher, float]:
    """A trained model's learned index exported to FAISS (no training) as ``poeem export`` does
    by default (fast scan for 4-bit PQ codes), and the export seconds."""

    def export() -> FaissSearcher:
        with torch.no_grad():
            items = model.all_item_embeddings(item_features(data))
        fast_scan = default_fast_scan(model.index.config)
        _, index = export_learned(model.index, items, None, model.config.search_metric, fast_scan)
        return FaissSearcher(index)

    return timed(export)


def item_features(data: Any) -> torch.Tensor | None:
    """The data's (n, features) item features, if it has them."""
    return None if data.item_features is None else torch.from_numpy(data.item_features)


def distilled_items(
    encode: Callable[[np.ndarray], torch.Tensor],
    query_rows: np.ndarray,
    items: torch.Tensor,
    budget: tuple,
    out: Path,
    fit_seed: int | None = None,
) -> FaissSearcher:
    """``poeem distill --items --queries`` with its defaults at ``budget`` (lists, D, seed): an
    index fitted on the (n, dim) ``items``, distilled from the embeddings of the queries
    ``query_rows`` (no labels): the training queries, as a run distils from, so that the queries
    it is evaluated on never teach it. ``seed`` orders the distillation; ``fit_seed`` seeds the
    k-means fit (None: the layer's default)."""
    with torch.no_grad():
        queries = encode(query_rows).float().numpy()
    lists, d, seed = budget
    settings = {"num_coarse": lists, "num_subspaces": d}  # D bytes at its default K = 256
    if fit_seed is not None:
        settings["seed"] = fit_seed
    config = DistillConfig(seed=seed)
    searcher, _ = distill_embeddings(
        items.float().numpy(), queries, out, settings, config=config, progress=False
    )
    return FaissSearcher(build_faiss_index(searcher.tensors, "ip", searcher.manifest.fast_scan))


def measure(
    method: str,
    built: Built,
    encode: Callable[[np.ndarray], torch.Tensor],
    data: Any,
    pre: Preset,
    exact_qps: float,
) -> list[dict[str, Any]]:
    """One row per search setting, fastest first, up to the first slow one slower than exact
    search (``exact_qps``): recall (headline metric) and queries per second, and for a FAISS IVF
    index its list balance (largest list, std of list sizes)."""
    index, build_s, bytes_per_item, settings = built
    k = int(pre.headline.split("@")[1])
    sizes = list_sizes(index.index) if isinstance(index, FaissSearcher) else None
    balance = list_balance(sizes) if sizes is not None else {}
    with torch.no_grad():
        xq = encode(data.eval_queries())
    rows = []
    for setting in settings:
        qps = best_qps(index, xq, k, setting)
        if isinstance(setting, tuple):  # a re-ranking group's (nprobe, F)
            recall = rerank_recall(index, encode, data, pre, setting)
        else:
            recall = evaluate_retrieval(index, encode, data, (k,), setting)[pre.headline]
        label = setting_label(method, setting)
        rows.append(
            {
                "method": method,
                "default": method in (DEFAULT_METHOD, RERANK_DEFAULT),
                "bytes_per_item": bytes_per_item,
                "setting": label,
                "recall": recall,
                "qps": qps,
                "build_s": build_s,
                **balance,
            }
        )
        if qps < exact_qps * QPS_SECONDS["stop_below_exact"] and xq.shape[0] / qps > SLOW_PASS_S:
            break
    best = max(rows, key=lambda r: r["recall"])
    print(f"  {method}: best {pre.headline} {best['recall']:.4f} ({best['setting']})", flush=True)
    return rows


def rerank_recall(
    index: Any,
    encode: Callable[[np.ndarray], torch.Tensor],
    data: Any,
    pre: Preset,
    setting: tuple[int, float],
) -> float:
    """The headline metric of ``index`` searched with ``setting`` (nprobe, F), each query's
    training items excluded as everywhere here, with as many re-ranked candidates per query as
    the timed search (k results, no exclusions) re-ranks: a query with e excluded items asks for
    k + e results with F k + e candidates, and its excluded items are dropped afterwards. (The
    usual over-fetch of k + 256 results would give every query F (k + 256) candidates.)"""
    k = int(pre.headline.split("@")[1])
    nprobe, factor = setting
    every = data.eval_queries()
    exclude = data.train_csr() if data.exclude_train else None
    extra = np.zeros(len(every), np.int64) if exclude is None else exclude.lengths()[every]
    extra = np.minimum(extra, index.ntotal - k)
    totals: dict[str, float] = {}
    for e in np.unique(extra):
        group = every[extra == e]
        width = k + int(e)
        inner = (nprobe, (factor * k + e) / width if factor > 1 else 1.0)
        for start in range(0, len(group), 2048):
            rows = group[start : start + 2048]
            with torch.no_grad():
                ids = index.search(encode(rows), width, inner)[1].numpy()
            if exclude is not None:
                ids = np.where(exclude.contains(rows, ids), -1, ids)
                ids = np.take_along_axis(ids, np.argsort(ids < 0, axis=1, kind="stable"), axis=1)
            topk = ids[:, :k]
            if data.relevance is not None:
                hits = data.relevance(rows, np.where(topk < 0, 0, topk)) & (topk >= 0)
                num_relevant = data.relevant_counts[rows]
            else:
                hits, num_relevant = data.test.contains(rows, topk), data.test.lengths()[rows]
            for name, value in ranking_metric_sums(hits, num_relevant, (k,)).items():
                totals[name] = totals.get(name, 0.0) + value
    return totals[pre.headline] / max(1, len(every))


def setting_label(method: str, setting: int | tuple[int, float]) -> str:
    """How a row names its search setting: efSearch, nprobe, or nprobe and re-ranking factor F."""
    if method == "hnsw":
        return f"efSearch={setting}"
    if isinstance(setting, tuple):
        nprobe, factor = setting
        return f"nprobe={nprobe}" if factor <= 1 else f"nprobe={nprobe},F={factor:g}"
    return f"nprobe={setting}"


class Reranked:
    """An index directory searched with re-ranking: ``search(xq, k, (nprobe, F))``."""

    def __init__(self, searcher: Searcher) -> None:
        self.searcher, self.ntotal = searcher, searcher.ntotal

    def search(
        self, xq: torch.Tensor, k: int, setting: tuple[int, float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(nq, dim) queries -> (nq, k) scores and ids."""
        nprobe, factor = setting
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nprobe clamped to the lists
            d, i = self.searcher.search(xq, k, nprobe, rerank=factor)
        return torch.from_numpy(d), torch.from_numpy(i)


def baseline_reference(pre: Preset, seed: int, lists: int, d: int, work: Path) -> tuple[Any, ...]:
    """Train the model without the layer and search it exactly: (data, the query encoder, (n,
    dim) item embeddings, the exact reference {recall, qps, bytes_per_item}, {"baseline":
    training seconds})."""
    cfg = replace(pre, budget=(lists, d, 256)).run_config(seed, None, (1,))
    data = load_data(cfg.data)
    k = int(pre.headline.split("@")[1])
    baseline, metrics = train_run(cfg, work / f"baseline-{seed}")
    encode = remembered(QueryEncoder.from_model(baseline, data).by_rows)
    with torch.no_grad():
        items = baseline.all_item_embeddings(item_features(data))
        xq = encode(data.eval_queries())
    exact_index = FaissSearcher(faiss.IndexFlatIP(items.shape[1]))
    exact_index.index.add(np.ascontiguousarray(items.float().numpy()))
    exact = {
        "recall": evaluate_retrieval(exact_index, encode, data, (k,), 1)[pre.headline],
        "qps": best_qps(exact_index, xq, k, 1),
        "bytes_per_item": 4.0 * items.shape[1],
    }
    print(f"  exact: {pre.headline} {exact['recall']:.4f}", flush=True)
    return data, encode, items, exact, {"baseline": metrics["train_s"]}


def poeem_default_run(pre: Preset, seed: int, lists: int, d: int, work: Path, data: Any) -> tuple[Any, dict]:
    """The default run at ``d`` bytes (K = 16, 2d sub-codes; a text tower's fitted index takes d
    8-bit codes) and its metrics."""
    cfg = poeem_config(pre, seed, (lists, 2 * d, 16), None, None)
    if cfg.model.index_schedule == "after_training":
        del cfg.model.poeem["codebook_size"]
    return train_run(cfg, work / f"poeem-{seed}")


def rerank_seed(
    pre: Preset,
    seed: int,
    lists: int,
    d: int,
    work: Path,
    methods: list[str],
    grid: tuple[list[int], list[float]],
) -> tuple[list[dict[str, Any]], dict]:
    """The re-ranking group's rows for one seed (module docstring), the exact reference and the
    training seconds; ``grid`` is (nprobes, factors F)."""
    nprobes, factors = grid
    rows: list[dict[str, Any]] = []
    data, encode, items, exact, train_s = baseline_reference(pre, seed, lists, d, work)
    dim = items.shape[1]
    x = np.ascontiguousarray(items.float().numpy())
    grids = {m: [[(n, f) for n in nprobes] for f in factors] for m, v in RERANK_METHODS.items() if v}
    grids.update({m: [[(n, 1.0) for n in nprobes]] for m, v in RERANK_METHODS.items() if not v})
    specs = {
        "faiss-ivfpq-refine-sq8": f"IVF{lists},PQ{d}x8,Refine(SQ8)",
        "faiss-ivfpq-fastscan-refine-sq8": f"IVF{lists},PQ{2 * d}x4fs,Refine(SQ8)",
        "faiss-ivfpq-fastscan-refine-fp16": f"IVF{lists},PQ{2 * d}x4fs,Refine(SQfp16)",
        "faiss-ivfpq": f"IVF{lists},PQ{d}x8",
    }
    scann = {"scann-lut16-reorder-int8": "int8", "scann-lut16-reorder-bf16": "bfloat16"}

    def sweep(
        method: str, index: Any, build_s: float, run_encode: Callable[[np.ndarray], torch.Tensor]
    ) -> None:
        size = float(d + RERANK_METHODS[method] * dim)
        for settings in grids[method]:
            rows.extend(
                measure(method, (index, build_s, size, settings), run_encode, data, pre, exact["qps"])
            )

    for method in methods:
        if method in specs:
            index, seconds = timed(lambda spec=specs[method]: RefinedFaiss(x, spec, seed))
            sweep(method, index, seconds, encode)
        elif method in scann:
            built, seconds = timed(
                lambda r=scann[method]: ScannIndex(items, lists, 2 * d, 16, reorder=r, max_candidates=100)
            )
            sweep(method, built, seconds, encode)
    poeem_methods = [m for m in methods if m.startswith("poeem")]
    if poeem_methods:
        model, metrics = poeem_default_run(pre, seed, lists, d, work, data)
        train_s["poeem"] = metrics["train_s"]
        encode = remembered(QueryEncoder.from_model(model, data).by_rows)
        with torch.no_grad():
            poeem_items = model.all_item_embeddings(item_features(data))
        fast_scan = default_fast_scan(model.index.config)
        for method in poeem_methods:
            precision = method.removeprefix("poeem-rerank-") if method != "poeem" else "sq8"
            out = work / f"{method}-{seed}"
            searcher, export_s = timed(
                lambda out=out, precision=precision: Searcher.create(
                    out,
                    model.index,
                    poeem_items,
                    None,
                    model.config.search_metric,
                    fast_scan,
                    rerank=precision,
                )
            )
            sweep(method, Reranked(searcher), after_training_seconds(metrics) + export_s, encode)
    return rows, {"exact": exact, "train_s": train_s}


def poeem_config(
    pre: Preset, seed: int, budget: tuple[int, int, int], refit: str | None, distill_epochs: int | None
) -> Any:
    """The run of the layer's defaults at ``budget`` (coarse_K, D, K), with ``refit``."""
    lists = budget[0]
    cfg = replace(pre, budget=budget).run_config(seed, "poeem-ip", (1,))
    cfg.eval = replace(cfg.eval, num_coarse=lists)
    kmeans_points = pre.kmeans_points_per_list * lists
    cfg.model.poeem["buffer_size"] = max(cfg.model.poeem["buffer_size"], kmeans_points)
    cfg.train = replace(cfg.train, refit=refit, distill_epochs=distill_epochs if refit else None)
    return cfg


def one_seed(
    pre: Preset, seed: int, lists: int, d: int, work: Path, methods: list[str], distill_epochs: int | None
) -> tuple[list[dict[str, Any]], dict]:
    """The rows of ``methods`` for one seed, the exact reference, and the training seconds."""
    rows: list[dict[str, Any]] = []
    data, encode, items, exact, train_s = baseline_reference(pre, seed, lists, d, work)
    for method, built in peers(items, lists, d, seed, methods):
        print(f"  {method} built in {built[1]:.1f}s", flush=True)
        rows += measure(method, built, encode, data, pre, exact["qps"])
    nprobes = [2**i for i in range(lists.bit_length())]
    if "poeem-distill-items" in methods:
        out = work / f"items-{seed}"
        searcher, build_s = timed(
            lambda: distilled_items(encode, np.unique(data.train_queries), items, (lists, d, seed), out)
        )
        rows += measure(
            "poeem-distill-items", (searcher, build_s, float(d), nprobes), encode, data, pre, exact["qps"]
        )

    if {"poeem-k256", "poeem-refit"} & set(methods):  # one run: a refitted run keeps its index as trained
        refit = "rq" if "poeem-refit" in methods else None
        run = work / f"k256-{seed}"
        cfg = poeem_config(pre, seed, (lists, d, 256), refit, distill_epochs)
        cfg.model.poeem["schedule"] = "joint"  # the layer trained with the model, text towers too
        model, metrics = train_run(cfg, run)
        train_s["poeem-k256"] = metrics["train_s"]
        encode = remembered(QueryEncoder.from_model(model, data).by_rows)
        searcher, export_s = poeem_searcher(model, data)
        build_s = after_training_seconds(metrics) + export_s
        name = "poeem-refit" if refit else "poeem-k256"
        rows += measure(name, (searcher, build_s, float(d), nprobes), encode, data, pre, exact["qps"])
        if refit and "poeem-k256" in methods:
            _, model = load_run(run, as_trained=True)
            model = attach_data(model, data, progress=False)  # a text model's texts
            searcher, export_s = poeem_searcher(model, data)
            rows += measure(
                "poeem-k256", (searcher, export_s, float(d), nprobes), encode, data, pre, exact["qps"]
            )
    # the defaults: K = 16, twice the sub-codes, exported as fast scan; and the same distilled.
    # Text towers fit their index after training, where the default takes D 8-bit codes instead
    for name, epochs in (("poeem", None), ("poeem-distilled", DEFAULT_DISTILL_EPOCHS)):
        if name not in methods:
            continue
        cfg = poeem_config(pre, seed, (lists, 2 * d, 16), None, None)
        if cfg.model.index_schedule == "after_training":
            if epochs is not None:  # its default already distils, for as many epochs
                print(f"  {name}: the same as poeem for towers that fit their index after training")
                continue
            del cfg.model.poeem["codebook_size"]
        cfg.train = replace(cfg.train, distill_epochs=epochs)
        model, metrics = train_run(cfg, work / f"{name}-{seed}")
        train_s[name] = metrics["train_s"]
        searcher, export_s = poeem_searcher(model, data)
        build_s = after_training_seconds(metrics) + export_s
        encode = remembered(QueryEncoder.from_model(model, data).by_rows)
        rows += measure(name, (searcher, build_s, float(d), nprobes), encode, data, pre, exact["qps"])
    return rows, {"exact": exact, "train_s": train_s}


def mean_rows(per_seed: list[list[dict[str, Any]]], order: list[str] = METHODS) -> list[dict[str, Any]]:
    """Mean (and std) over seeds of each (method, setting) row, in ``order`` of methods."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for rows in per_seed:
        for row in rows:
            grouped[(row["method"], row["setting"])].append(row)
    out = []
    for rows in grouped.values():
        entry = {key: rows[0][key] for key in ("method", "default", "bytes_per_item", "setting")}
        for key in ("recall", "qps", "build_s", "largest_list", "list_size_std"):
            if key in rows[0]:
                add_mean_std(entry, key, [r[key] for r in rows])
        entry["seeds"] = len(rows)
        out.append(entry)
    return sorted(out, key=lambda r: (order.index(r["method"]), -r["qps"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset", required=True, choices=["synthetic", "ml-100k", "gowalla", "yelp2018", "scifact"]
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--num-subspaces", type=int, default=None, help="D: bytes per item (default 8)")
    p.add_argument("--lists", type=int, default=None, help="default: FAISS's guideline, 4 sqrt(n)")
    p.add_argument("--methods", nargs="+", default=None, choices=[*METHODS, *RERANK_METHODS])
    p.add_argument("--rerank", action="store_true", help="the re-ranking group (module docstring)")
    p.add_argument("--rerank-factors", type=float, nargs="+", default=[2, 4, 8], help="F, candidates / k")
    p.add_argument("--rerank-max-nprobe", type=int, default=64)
    p.add_argument(
        "--refit-distill-epochs", type=int, default=None, help="the refit's distillation (default: the run's)"
    )
    p.add_argument(
        "--merge",
        action="store_true",
        help="measure only --methods and put their rows in place of theirs in the existing results "
        "file (same seeds); the other rows are kept",
    )
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    order = list(RERANK_METHODS) if args.rerank else METHODS
    args.methods = args.methods or order
    if set(args.methods) - set(order):
        raise SystemExit(f"--methods of {'the re-ranking group' if args.rerank else 'the frontier'}: {order}")
    pre = preset(args.dataset, args.data_dir)
    if args.tiny:
        pre = tiny(pre)
        QPS_SECONDS["least_s"] = QPS_SECONDS["stop_below_exact"] = 0.0
    d = args.num_subspaces or (4 if args.tiny else 8)
    num_items = load_data(pre.run_config(args.seeds[0], None, (1,)).data).num_items
    lists = args.lists or (4 if args.tiny else guideline_lists(num_items))
    print(f"{args.dataset}: {num_items} items, {lists} lists, {d} bytes per item", flush=True)
    work = Path(tempfile.mkdtemp(prefix="poeem-frontier-"))
    per_seed, extras = [], []
    try:
        for seed in args.seeds:
            print(f"seed {seed}", flush=True)
            if args.rerank:
                nprobes = [2**i for i in range(lists.bit_length()) if 2**i <= args.rerank_max_nprobe]
                grid = (nprobes, args.rerank_factors)
                rows, extra = rerank_seed(pre, seed, lists, d, work, args.methods, grid)
            else:
                rows, extra = one_seed(pre, seed, lists, d, work, args.methods, args.refit_distill_epochs)
            per_seed.append(rows)
            extras.append(extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    suffix = f"_D{args.num_subspaces}" if args.num_subspaces else ""
    name = f"frontier_{'rerank_' if args.rerank else ''}{args.dataset}{suffix}{'_tiny' if args.tiny else ''}"
    commands: list[str] = []
    if args.merge:
        old = json.loads(((args.results_dir or RESULTS) / f"{name}.json").read_text())
        if old["seeds"] != args.seeds:
            raise SystemExit(f"--merge needs the file's seeds {old['seeds']}")
        per_seed = [
            [r for r in kept if r["method"] not in args.methods] + new
            for kept, new in zip(old["per_seed"], per_seed, strict=True)
        ]
        commands = [*old.get("commands", [old["command"]]), command_line()]
    exact: dict[str, Any] = {"bytes_per_item": extras[0]["exact"]["bytes_per_item"]}
    for key in ("recall", "qps"):
        add_mean_std(exact, key, [e["exact"][key] for e in extras])
    if args.merge:  # the reference the kept rows were measured against
        exact = old["exact"]
    rows = mean_rows(per_seed, order)
    grid_record = {"factors": args.rerank_factors, "max_nprobe": args.rerank_max_nprobe}
    train_s: dict[str, Any] = dict(old["train_s"]) if args.merge else {}
    for key in extras[0]["train_s"]:
        add_mean_std(train_s, key, [e["train_s"][key] for e in extras])
    methods = list(dict.fromkeys(r["method"] for r in rows))
    result = {
        "dataset": args.dataset,
        "headline": pre.headline,
        "num_items": num_items,
        "threads": 1,
        "lists": lists,
        "lists_rule": "4 sqrt(n), rounded to a power of two (FAISS's guideline: 4-16 sqrt(n))",
        "seeds": args.seeds,
        "tiny": args.tiny,
        "exact": exact,
        "rows": rows,
        "pareto": {
            m: [r["setting"] for r in pareto_front([r for r in rows if r["method"] == m])] for m in methods
        },
        "train_s": train_s,
        "per_seed": per_seed,
        **({"commands": commands} if commands else {}),
        **({"rerank": grid_record} if args.rerank else {}),
    }
    path = save_result(name, result, args.results_dir)
    for row in rows:
        print(
            f"{row['method']:32} {row['setting']:18} {pre.headline}={row['recall']:.4f} "
            f"qps={row['qps']:9.0f} build={row['build_s']:.2f}s"
        )
    print("wrote", path)


if __name__ == "__main__":
    main()
