"""Load test of `poeem serve` on loopback: QPS and latency against in-process search.

Starts `poeem serve` on a free 127.0.0.1 port over an index directory (``--index-dir``, e.g.
one exported from a Gowalla run), or over a synthetic index of Gowalla's shape (40,981 items,
dim 64, IVF16,PQ8x8) built here. Each (clients, batch) level sends a fixed number of requests
from keep-alive HTTP clients and stops by itself. The same searches then run in process
(``IndexService.search``, no HTTP) with the same number of threads, so the service overhead is
a ratio measured in one run. During the 8-client batch-1 level, a reload and an add are sent;
every failed request is counted.

    python benchmarks/serve_load.py                                  # synthetic index
    python benchmarks/serve_load.py --index-dir index/gowalla        # an exported index
"""

from __future__ import annotations

import argparse
import functools
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from export_speed import clustered_embeddings

from poeem import PoeemLayer, Searcher
from poeem.serve.service import IndexService, Query, set_search_threads

from common import save_result

TOKEN = "load-test-token-0123456789"


def synthetic_index(directory: Path, n: int, dim: int, seed: int) -> None:
    """An index directory of n clustered items (no query tower: queries are embeddings)."""
    x = clustered_embeddings(n, dim, seed)
    layer = PoeemLayer(dim=dim, num_subspaces=8, codebook_size=256, num_coarse=16, buffer_size=min(n, 20_000))
    layer.initialize(x[: min(n, 20_000)])
    Searcher.create(directory, layer, x, metric="cosine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_queries(searcher: Searcher, count: int, seed: int) -> list[dict[str, Any]]:
    """Query objects: ids through the saved query tower when there is one, else embeddings."""
    rng = np.random.default_rng(seed)
    if searcher.query_tower is not None:
        keys = (
            searcher.query_keys.keys
            if searcher.query_keys is not None
            else np.arange(searcher.query_tower.num_ids)
        )
        return [{"id": k.item() if hasattr(k, "item") else k} for k in rng.choice(keys, count)]
    x = rng.normal(size=(count, searcher.manifest.dim))
    return [{"embedding": row.tolist()} for row in x / np.linalg.norm(x, axis=1, keepdims=True)]


def concurrently(count: int, clients: int, one: Callable[[int], bool], during: Any = None) -> dict[str, Any]:
    """Call ``one(i)`` for every i < count from ``clients`` threads (and ``during()`` beside them);
    latency percentiles, throughput and how many calls returned False."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    work = iter(range(count))

    def worker() -> None:
        while True:
            with lock:
                i = next(work, None)
            if i is None:
                return
            started = time.perf_counter()
            ok = one(i)
            with lock:
                latencies.append(time.perf_counter() - started)
                failures[0] += not ok

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    threads += [threading.Thread(target=during)] if during else []
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "seconds": elapsed,
        "requests_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "failures": failures[0],
    }


def http_level(port: int, bodies: list[bytes], clients: int, during: Any = None) -> dict[str, Any]:
    """Send every body once, spread over ``clients`` keep-alive connections (one per thread)."""
    local = threading.local()

    def one(i: int) -> bool:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            local.conn.request("POST", "/search", bodies[i], {"content-type": "application/json"})
            response = local.conn.getresponse()
            response.read()
            return response.status == 200
        except OSError:
            local.conn.close()
            del local.conn
            return False

    return concurrently(len(bodies), clients, one, during)


def in_process_level(
    service: IndexService, batches: list[list[Query]], clients: int, k: int
) -> dict[str, Any]:
    """The same searches through ``IndexService.search`` from ``clients`` threads, no HTTP."""
    return concurrently(len(batches), clients, lambda i: bool(service.search(batches[i], k, 1)))


def post(port: int, path: str, body: Any) -> int:
    """Status of an authorised POST."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    conn.request("POST", path, json.dumps(body), headers)
    status = conn.getresponse().status
    conn.close()
    return status


def reload_and_add(port: int, searcher: Searcher, statuses: list[int]) -> None:
    """A reload, then an add of one new item, in the middle of a level."""
    time.sleep(0.2)
    statuses.append(post(port, "/reload", None))
    string_ids = searcher.item_keys is not None and not searcher.item_keys.is_integer
    embedding = torch.nn.functional.normalize(torch.randn(1, searcher.manifest.dim), dim=1)[0].tolist()
    item = {"id": "load-test-item" if string_ids else 10**12, "embedding": embedding}
    statuses.append(post(port, "/items", {"items": [item]}))


def start_server(index_dir: Path, search_threads: int, workers: int) -> tuple[subprocess.Popen, int]:
    """`poeem serve` on a free loopback port, once it is ready."""
    port = free_port()
    args = [sys.executable, "-m", "poeem.cli", "serve", str(index_dir), "--port", str(port)]
    args += ["--search-threads", str(search_threads), "--workers", str(workers)]
    server = subprocess.Popen(
        [*args, "--log-level", "warning", "--poll-s", "0"], env={**os.environ, "POEEM_TOKEN": TOKEN}
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/ready")
            if conn.getresponse().status == 200:
                return server, port
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                raise
            time.sleep(0.2)


def run_levels(port: int, service: IndexService, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (batch, clients) level, over HTTP and in process."""
    rows = []
    for batch in args.batches:
        count = max(50, args.requests // batch)
        queries = make_queries(service.searcher, count * batch, args.seed + batch)
        groups = [queries[i * batch : (i + 1) * batch] for i in range(count)]
        bodies = [json.dumps({"queries": g, "k": args.k, "nprobe": 1}).encode() for g in groups]
        as_queries = [[Query(q.get("id"), None, q.get("embedding")) for q in g] for g in groups]
        for clients in args.clients:
            statuses: list[int] = []
            side = None
            if batch == 1 and clients == 8:
                side = functools.partial(reload_and_add, port, service.searcher, statuses)
            served = http_level(port, bodies, clients, side)
            local = in_process_level(service, as_queries, clients, args.k)
            row = {
                "batch": batch,
                "clients": clients,
                "service": served,
                "in_process": local,
                "queries_per_s_service": served["requests_per_s"] * batch,
                "queries_per_s_in_process": local["requests_per_s"] * batch,
                "service_over_in_process": served["requests_per_s"] / local["requests_per_s"],
                "reload_and_add_statuses": statuses,
            }
            rows.append(row)
            print(
                f"batch {batch:>2} clients {clients:>2}: {served['requests_per_s']:8.1f} req/s, "
                f"p50 {served['p50_ms']:.2f} ms, p99 {served['p99_ms']:.2f} ms, {served['failures']} failed; "
                f"in process {local['requests_per_s']:8.1f} req/s ({row['service_over_in_process']:.2f}x)"
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index-dir", type=Path, default=None, help="an exported index (default: synthetic)")
    p.add_argument("--items", type=int, default=40_981, help="synthetic index size (Gowalla's)")
    p.add_argument("--requests", type=int, default=2000, help="requests per level at batch 1")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--search-threads", type=int, default=1, help="as `poeem serve --search-threads`")
    p.add_argument("--workers", type=int, default=1, help="as `poeem serve --workers`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        index_dir = Path(tmp) / "ix"
        if args.index_dir is None:
            synthetic_index(index_dir, args.items, 64, args.seed)
            source = f"synthetic, {args.items:,} items, dim 64, IVF16,PQ8x8, cosine"
        else:
            shutil.copytree(args.index_dir, index_dir)  # the test adds an item: never touch the original
            source = str(args.index_dir)
        set_search_threads(args.search_threads)  # in process as in the server
        service = IndexService(index_dir)
        server, port = start_server(index_dir, args.search_threads, args.workers)
        try:
            rows = run_levels(port, service, args)
        finally:
            server.terminate()
            server.wait(timeout=30)
    result = {
        "config": vars(args)
        | {"results_dir": None, "index_dir": str(args.index_dir) if args.index_dir else None},
        "index": source,
        "items": service.searcher.ntotal,
        "rows": rows,
        "total_failures": sum(r["service"]["failures"] for r in rows)
        + sum(status != 200 for r in rows for status in r["reload_and_add_statuses"]),
    }
    print("wrote", save_result("serve_load", result, args.results_dir))


if __name__ == "__main__":
    main()
