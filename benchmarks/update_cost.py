"""What one update costs: adding single items to a large served index.

Builds a synthetic index of ``--items`` clustered unit vectors (dim 64, IVF16,PQ8x8, cosine),
serves it with `poeem serve` (one worker), and adds one item per `POST /items`, first on a
quiet server, then while ``--clients`` keep-alive clients search at batch 1. Each add writes
a segment file and the manifest; the bytes that every add wrote and its latency are recorded.
Finally `poeem compact` folds the segments into a new base: the cost that every update paid
before segments existed (a full rewrite), measured here once.

    python benchmarks/update_cost.py                      # 1,000,000 items
    python benchmarks/update_cost.py --items 20000 --adds 20 --results-dir /tmp/x   # smoke
"""

from __future__ import annotations

import argparse
import http.client
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from serve_load import TOKEN, http_level, start_server, synthetic_index

from poeem import Searcher

from common import save_result


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--adds", type=int, default=200, help="single-item adds per phase")
    p.add_argument("--clients", type=int, default=8, help="search clients during the second phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

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
        segments = len(searcher.index.segments)
        before = directory_files(directory)
        started = time.perf_counter()
        searcher.compact()
        compact_s = time.perf_counter() - started
        after = directory_files(directory)
        compact_bytes = sum(size for name, (size, _) in after.items() if name not in before)
    payload = {
        "items": args.items,
        "index_bytes": index_bytes,
        "build_s": build_s,
        "quiet": quiet,
        "under_search_load": {**under_load, "search": searching, "search_clients": args.clients},
        "compaction": {"segments": segments, "seconds": compact_s, "bytes_written": compact_bytes},
    }
    print(json.dumps(payload, indent=2))
    save_result("update_cost", payload, args.results_dir)


if __name__ == "__main__":
    main()
