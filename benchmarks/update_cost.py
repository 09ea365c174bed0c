"""What updates cost: adding single items to a large served index, and searching an index
that holds removed items.

Adds: builds a synthetic index of ``--items`` clustered unit vectors (dim 64, IVF16,PQ8x8,
cosine), serves it with `poeem serve` (one worker), and adds one item per `POST /items`, first
on a quiet server, then while ``--clients`` keep-alive clients search at batch 1. Each add
writes a segment file and the manifest; the bytes that every add wrote and its latency are
recorded. Finally `poeem compact` folds the segments into a new base: the cost that every
update paid before segments existed (a full rewrite), measured here once.

Removes: ``--remove-items`` random vectors (dim 64, 8 bytes per item: the default 16 x 4-bit
PQ codes, exported as fast scan; inner product), as a flat index and as IVF``--nlist``. Then
0, 1, 5 and 10% of the items are removed (tombstones; compaction held off) and ``--queries``
queries are searched for k=10, one per call (latency) and all in one call (ms per query), one
thread. A flat fast-scan index takes no FAISS id selector, so it drops removed ids from a
bounded over-fetch; the time of fetching k plus every removed id (what it did before) is
measured beside it. Every result is checked against the compacted index.

    python benchmarks/update_cost.py                      # both parts: 1,000,000 and 200,000 items
    python benchmarks/update_cost.py --parts removes      # removes only (the adds result is kept)
    python benchmarks/update_cost.py --items 20000 --adds 20 --remove-items 20000 --results-dir /tmp/x
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from serve_load import TOKEN, http_level, start_server, synthetic_index

import poeem.search.segments as segments
from poeem import PoeemLayer, Searcher
from poeem.export.faiss_codec import build_faiss_index
from poeem.search import FaissSearcher
from poeem.search.segments import SegmentedFaissSearcher, takes_selector

from common import load_result, save_part, save_result

SHARES = (0.0, 0.01, 0.05, 0.10)


def directory_files(directory: Path) -> dict[str, tuple[int, int]]:
    """(size, modification time) of every file in the index directory."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir() if p.is_file()}


def add_one(conn: http.client.HTTPConnection, item_id: int, rng: np.random.Generator) -> tuple[float, int]:
    """Latency (ms) and status of one single-item add."""
    x = rng.normal(size=64)
    body = json.dumps({"items": [{"id": item_id, "embedding": (x / np.linalg.norm(x)).tolist()}]})
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    started = time.perf_counter()
    conn.request("POST", "/items", body, headers)
    response = conn.getresponse()
    response.read()
    return (time.perf_counter() - started) * 1000, response.status


def adds(port: int, directory: Path, count: int, first_id: int, seed: int) -> dict[str, Any]:
    """``count`` sequential single-item adds: latency percentiles and bytes written per add."""
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies, written, failures = [], [], 0
    for i in range(count):
        before = directory_files(directory)
        ms, status = add_one(conn, first_id + i, rng)
        after = directory_files(directory)
        latencies.append(ms)
        failures += status != 200
        written.append(
            sum(size for name, (size, mtime) in after.items() if before.get(name) != (size, mtime))
        )
    conn.close()
    lat = np.array(latencies)
    return {
        "adds": count,
        "failures": failures,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "bytes_written_mean": float(np.mean(written)),
        "bytes_written_max": int(np.max(written)),
    }


def add_cost(args: argparse.Namespace) -> dict[str, Any]:
    """The adds part: single-item adds to a served index, quiet and under search load."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ix"
        started = time.perf_counter()
        synthetic_index(directory, args.items, 64, args.seed)
        build_s = time.perf_counter() - started
        index_bytes = sum(size for size, _ in directory_files(directory).values())
        server, port = start_server(directory, search_threads=1, workers=1)
        try:
            quiet = adds(port, directory, args.adds, 10**12, args.seed)
            rng = np.random.default_rng(args.seed + 1)
            x = rng.normal(size=(4 * args.adds * args.clients, 64))
            bodies = [json.dumps({"queries": [{"embedding": row.tolist()}], "k": 20}).encode() for row in x]
            under_load: dict[str, Any] = {}

            def add_while_searching() -> None:
                under_load.update(adds(port, directory, args.adds, 2 * 10**12, args.seed + 2))

            searching = http_level(port, bodies, args.clients, during=add_while_searching)
        finally:
            server.terminate()
            server.wait(timeout=60)
        searcher = Searcher.load(directory)
        segment_count = len(searcher.index.segments)
        before = directory_files(directory)
        started = time.perf_counter()
        searcher.compact()
        compact_s = time.perf_counter() - started
        after = directory_files(directory)
        compact_bytes = sum(size for name, (size, _) in after.items() if name not in before)
    return {
        "items": args.items,
        "index_bytes": index_bytes,
        "build_s": build_s,
        "quiet": quiet,
        "under_search_load": {**under_load, "search": searching, "search_clients": args.clients},
        "compaction": {"segments": segment_count, "seconds": compact_s, "bytes_written": compact_bytes},
    }


def interleaved_ms(
    searches: dict[str, Callable[[torch.Tensor], Any]], xq: torch.Tensor, repeats: int
) -> dict[str, tuple[float, float]]:
    """For each search: (median ms of one query per call, ms per query of all queries in one
    call), the best of ``repeats`` passes. The searches take turns in every pass, so a busy
    moment of a shared machine slows them alike."""
    singles: dict[str, list[float]] = {name: [] for name in searches}
    batches: dict[str, list[float]] = {name: [] for name in searches}
    for _ in range(repeats):
        for name, search in searches.items():
            one = []
            for row in xq:
                started = time.perf_counter()
                search(row[None])
                one.append(time.perf_counter() - started)
            singles[name].append(float(np.median(one)) * 1000)
            started = time.perf_counter()
            search(xq)
            batches[name].append((time.perf_counter() - started) * 1000 / len(xq))
    return {name: (min(singles[name]), min(batches[name])) for name in searches}


def as_before(search: Callable[[torch.Tensor], Any], removed: int, total: int, xq: torch.Tensor) -> Any:
    """``search(xq)`` as a base without an id selector searched before: it fetched k plus every
    one of its ``removed`` ids (of ``total`` items), then dropped them."""
    rule = SegmentedFaissSearcher.first_width
    SegmentedFaissSearcher.first_width = lambda self, k: min(k + removed, total)  # type: ignore[method-assign]
    try:
        return search(xq)
    finally:
        SegmentedFaissSearcher.first_width = rule  # type: ignore[method-assign]


def agreement(searcher: Searcher, xq: torch.Tensor, k: int, nprobe: int) -> dict[str, float]:
    """How often ``searcher``'s top-k equals an index rebuilt from its live items: the same k
    scores, and the same ids above the k-th score (items tied with it may come in any order)."""
    d, i = searcher.search(xq, k, nprobe=nprobe)
    rebuilt = FaissSearcher(build_faiss_index(searcher.tensors, "ip", fast_scan=True))
    d2, i2 = (t.numpy() for t in rebuilt.search(xq, k, nprobe))
    above = d != d[:, -1:]
    same = [set(a[u]) == set(b[u]) for a, b, u in zip(i, i2, above, strict=True)]
    return {
        "same_scores_as_rebuilt": float(np.mean((d == d2).all(1))),
        "same_ids_as_rebuilt": float(np.mean(same)),
    }


def remove_rows(
    x: torch.Tensor, xq: torch.Tensor, nlist: int, nprobe: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """One row per removed share of an index of ``x`` with ``nlist`` lists (0: flat)."""
    k, rng = 10, np.random.default_rng(args.seed + nlist)
    layer = PoeemLayer(dim=x.shape[1], num_coarse=nlist, buffer_size=20_000)  # 16 x 4-bit PQ: 8 bytes
    layer.initialize(x[:20_000])
    order = rng.permutation(x.shape[0])
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "ix"
        Searcher.create(directory, layer, x, metric="ip")
        searcher = Searcher.load(directory)
        base = faiss.read_index(str(directory / searcher.manifest.files["faiss"]))
        over_fetch = not takes_selector(base, faiss.IDSelectorAll())
        versions, searches = {}, {}
        for share in SHARES:  # each share is a fork: all of them stay open, to time by turns
            removed = round(share * x.shape[0])
            if removed > searcher.index.removed.numel():
                searcher = searcher.fork()
                searcher.remove(order[searcher.index.removed.numel() : removed])
            versions[share] = searcher
            searches[f"{share}"] = partial(searcher.search, k=k, nprobe=nprobe)
            if removed and over_fetch:
                searches[f"{share} before"] = partial(as_before, searches[f"{share}"], removed, x.shape[0])
        times = interleaved_ms(searches, xq, args.repeats)
    rows = []
    for share, version in versions.items():
        removed = int(version.index.removed.numel())
        row = {
            "index": f"IVF{nlist},PQ16x4fs" if nlist else "PQ16x4fs",
            "nprobe": nprobe,
            "removed_share": share,
            "removed": removed,
            "filter": ("over-fetch" if over_fetch else "id selector") if removed else "none",
            "ms_one_query": times[f"{share}"][0],
            "ms_per_query_batch": times[f"{share}"][1],
        }
        if f"{share} before" in times:
            row["ms_one_query_fetch_all_removed"] = times[f"{share} before"][0]
            row["ms_per_query_batch_fetch_all_removed"] = times[f"{share} before"][1]
        rows.append({**row, **agreement(version, xq, k, nprobe)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def remove_cost(args: argparse.Namespace) -> dict[str, Any]:
    """The removes part: search time against the share of removed items, flat and IVF."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    segments.COMPACT_SHARE = 1.0  # keep the tombstones: what is measured is searching with them
    rng = np.random.default_rng(args.seed)
    x = torch.from_numpy(rng.standard_normal((args.remove_items, 64)).astype(np.float32))
    xq = torch.from_numpy(rng.standard_normal((args.queries, 64)).astype(np.float32))
    rows = remove_rows(x, xq, 0, 1, args) + remove_rows(x, xq, args.nlist, args.nprobe, args)
    return {
        "items": args.remove_items,
        "dim": 64,
        "bytes_per_item": 8,
        "k": 10,
        "queries": args.queries,
        "threads": 1,
        "cpus": sorted(os.sched_getaffinity(0)),  # `taskset -c 0` pins the run to CPU 0
        "rows": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["adds", "removes"], default=["adds", "removes"])
    p.add_argument("--items", type=int, default=1_000_000, help="items of the adds part")
    p.add_argument("--adds", type=int, default=200, help="single-item adds per phase")
    p.add_argument("--clients", type=int, default=8, help="search clients during the second phase")
    p.add_argument("--remove-items", type=int, default=200_000, help="items of the removes part")
    p.add_argument("--nlist", type=int, default=512, help="lists of the IVF index of the removes part")
    p.add_argument("--nprobe", type=int, default=8)
    p.add_argument("--queries", type=int, default=500, help="queries timed in the removes part")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    if "adds" in args.parts:
        payload = add_cost(args)
        print(json.dumps(payload, indent=2))
        kept = load_result("update_cost", args.results_dir).get("removes")
        save_result("update_cost", {**payload, **({"removes": kept} if kept else {})}, args.results_dir)
    if "removes" in args.parts:
        save_part("update_cost", "removes", remove_cost(args), args.results_dir)


if __name__ == "__main__":
    main()
