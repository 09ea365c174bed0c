"""What re-ranking costs beside the codes' search: re-scoring F k candidates with the items'
stored vectors against the search that found them.

Builds a synthetic index of Gowalla's shape (``--items`` 40,981 clustered vectors, dim 64,
inner product, 1,024 lists, 8 bytes per item: the default 16 x 4-bit PQ codes, exported as fast
scan) with SQ8, fp16 and float vectors, and on one thread times, for ``--queries`` queries at
nprobe 16 and k = 10:

- ``codes_ms``: the codes' search for k (no re-ranking), ms per query;
- ``candidates_ms``: the codes' search for the ``--candidates`` candidates re-ranking needs;
- ``rescore_ms``: re-scoring those candidates alone (gather, decode, batched matmul, top-k);
- ``reranked_ms``: a whole re-ranked search (``Searcher.search(..., rerank=F)``).

Each is timed with all queries in one call (ms per query) and one query per call (latency,
median), best of ``--repeats``. The ratio ``rescore_ms / codes_ms`` is the share of the codes'
search time the re-scoring adds.

    python benchmarks/rerank_cost.py
    python benchmarks/rerank_cost.py --items 5000 --queries 50 --results-dir /tmp/x   # smoke
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from poeem import PoeemLayer, Searcher
from poeem.search.rerank import rescore

from common import save_result


def clustered(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) vectors around n / 40 random centres."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, n // 40), dim, generator=g)
    return centres[torch.randint(len(centres), (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)


def best_ms(run: Callable[[], Any], repeats: int) -> float:
    """The best of ``repeats`` wall times of ``run()``, in ms."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best * 1e3


def per_query(run: Callable[[torch.Tensor], Any], xq: torch.Tensor, repeats: int) -> dict[str, float]:
    """ms per query of ``run`` with every query in one call (``batch_ms``) and one per call
    (``latency_ms``: the median over queries of the best of ``repeats``)."""
    batch = best_ms(lambda: run(xq), repeats) / len(xq)
    single = [best_ms(lambda row=row: run(xq[row : row + 1]), repeats) for row in range(len(xq))]
    return {"batch_ms": batch, "latency_ms": float(np.median(single))}


def measure(searcher: Searcher, xq: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """The timings of one index (module docstring), ms per query."""
    stored = searcher.stored_vectors  # the lookup a re-ranked search uses
    assert stored is not None and searcher.vector_codec is not None
    k, nprobe, m = args.k, args.nprobe, args.candidates
    queries = xq.numpy()
    candidates = searcher.search(xq, m, nprobe, rerank=0)[1]
    row: dict[str, Any] = {
        "precision": searcher.vector_codec.precision,
        "vector_bytes": searcher.vector_codec.bytes_per_item(args.dim),
        "codes": per_query(lambda q: searcher.search(q, k, nprobe, rerank=0), xq, args.repeats),
        "candidates": per_query(lambda q: searcher.search(q, m, nprobe, rerank=0), xq, args.repeats),
        "reranked": per_query(lambda q: searcher.search(q, k, nprobe, rerank=m / k), xq, args.repeats),
    }
    single = [
        best_ms(lambda r=r: rescore(queries[r : r + 1], candidates[r : r + 1], stored, k, "ip"), args.repeats)
        for r in range(len(xq))
    ]
    row["rescore"] = {
        "batch_ms": best_ms(lambda: rescore(queries, candidates, stored, k, "ip"), args.repeats) / len(xq),
        "latency_ms": float(np.median(single)),
    }
    for mode in ("batch", "latency"):
        row[f"rescore_share_{mode}"] = row["rescore"][f"{mode}_ms"] / row["codes"][f"{mode}_ms"]
    print(
        f"{row['precision']:6} ms per query (latency): codes {row['codes']['batch_ms']:.4f} "
        f"({row['codes']['latency_ms']:.4f}), {m} candidates {row['candidates']['batch_ms']:.4f} "
        f"({row['candidates']['latency_ms']:.4f}), rescore {row['rescore']['batch_ms']:.4f} "
        f"({row['rescore']['latency_ms']:.4f}), reranked search {row['reranked']['batch_ms']:.4f} "
        f"({row['reranked']['latency_ms']:.4f}); rescore / codes {row['rescore_share_batch']:.2f} "
        f"(latency {row['rescore_share_latency']:.2f})",
        flush=True,
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=40_981, help="Gowalla's number of items")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--lists", type=int, default=1024)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--candidates", type=int, default=100, help="F k: the candidates re-scored")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    x = clustered(args.items, args.dim, seed=0)
    xq = clustered(args.queries, args.dim, seed=1)
    layer = PoeemLayer(
        dim=args.dim,
        num_subspaces=2 * 8,
        codebook_size=16,
        num_coarse=args.lists,
        warmup_steps=0,
        buffer_size=args.items,
    )
    layer.initialize(x)
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for precision in ("sq8", "fp16", "float"):
            searcher = Searcher.create(Path(work) / precision, layer, x, rerank=precision)
            rows.append(measure(searcher, xq, args))
    setup = {k: getattr(args, k) for k in ("items", "dim", "lists", "queries", "nprobe", "k", "candidates")}
    path = save_result(
        "rerank_cost",
        {"threads": 1, "index": "16 x 4-bit PQ, fast scan", **setup, "rows": rows},
        args.results_dir,
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
