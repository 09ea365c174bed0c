"""Search time of the two backends of an index directory: FAISS and poeem's torch ADC.

Both search the same learned IVF-PQ index (a layer fitted on a sample of clustered item
embeddings) with the same queries, at several nprobe. The torch ADC groups items by list and
scans only the probed lists; the earlier version scored every item before masking.

    python benchmarks/search_speed.py            # 200,000 x 64, IVF64,PQ8x8, 1,000 queries
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from export_speed import clustered_embeddings

from poeem import PoeemLayer
from poeem.export import build_faiss_index, learned_index
from poeem.search import FaissSearcher, TorchIVFPQ

from common import save_result


def timed_search(engine: FaissSearcher | TorchIVFPQ, xq: torch.Tensor, k: int, nprobe: int, repeats: int):
    """Best wall time of ``repeats`` searches, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        result = engine.search(xq, k, nprobe)
        best = min(best, time.perf_counter() - started)
    return best, result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=64)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    x = clustered_embeddings(args.n + args.queries, args.dim, args.seed)
    xb, xq = x[: args.n], x[args.n :]
    layer = PoeemLayer(
        dim=args.dim, num_subspaces=args.m, codebook_size=256, num_coarse=args.nlist, buffer_size=20_000
    )
    layer.initialize(xb[:20_000])
    tensors = learned_index(layer, xb)
    engines = {"faiss": FaissSearcher(build_faiss_index(tensors, "ip")), "torch": TorchIVFPQ(tensors, "ip")}
    rows = []
    for nprobe in args.nprobe:
        results = {}
        for name, engine in engines.items():
            seconds, results[name] = timed_search(engine, xq, args.k, nprobe, args.repeats)
            rows.append(
                {"backend": name, "nprobe": nprobe, "seconds": seconds, "qps": args.queries / seconds}
            )
        (_, faiss_ids), (_, torch_ids) = results["faiss"], results["torch"]
        overlap = np.mean(
            [
                len(set(a) & set(b)) / args.k
                for a, b in zip(faiss_ids.tolist(), torch_ids.tolist(), strict=True)
            ]
        )
        rows[-1]["topk_overlap_with_faiss"] = float(overlap)
        print(rows[-2], rows[-1])
    result = {
        "config": vars(args) | {"results_dir": None},
        "rows": rows,
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    print("wrote", save_result("search_speed", result, args.results_dir))


if __name__ == "__main__":
    main()
