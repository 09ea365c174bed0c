"""How often `--backend torch` and `--backend faiss` return the same top-k on a fast-scan index.

An index directory of ``--items`` clustered vectors (dim 64, the default layer: 16 x 4-bit PQ
codes, exported as FAISS fast scan) with ``--nlist`` lists, cosine; ``--queries`` queries near
items. Both backends search it at each nprobe; so does the torch search that scores the float
formula (no 8-bit rounding), as the torch backend did before it rounded as FAISS does. Per
query: identical id lists, identical id sets, identical ids above the k-th score (items tied
at it may differ), and all k scores within 1e-5 relative.

    python benchmarks/backend_agreement.py
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from export_speed import clustered_embeddings

from poeem import PoeemLayer, Searcher
from poeem.search import TorchIVFPQ

from common import save_result


def agreement(
    reference: tuple[np.ndarray, np.ndarray], other: tuple[np.ndarray, np.ndarray]
) -> dict[str, float]:
    """Shares of queries on which ``other`` (D, I) matches ``reference`` (FAISS's)."""
    (d1, i1), (d2, i2) = reference, other
    above = np.abs(d1 - d1[:, -1:]) > 1e-5 * np.abs(d1[:, -1:])  # ranked above the k-th score
    return {
        "identical_lists": float((i1 == i2).all(1).mean()),
        "same_sets": float(np.mean([set(a) == set(b) for a, b in zip(i1, i2, strict=True)])),
        "same_ids_above_ties": float(
            np.mean([set(a[u]) == set(b[u]) for a, b, u in zip(i1, i2, above, strict=True)])
        ),
        "scores_within_1e-5": float(np.isclose(d2, d1, rtol=1e-5, atol=0).all(1).mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--nlist", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 8])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    x = clustered_embeddings(args.items, 64, args.seed)
    layer = PoeemLayer(dim=64, num_coarse=args.nlist, buffer_size=min(args.items, 20_000))
    layer.initialize(x[:20_000])
    rng = np.random.default_rng(args.seed + 1)
    xq = x[rng.choice(args.items, args.queries)] + 0.1 * torch.from_numpy(
        rng.normal(size=(args.queries, 64)).astype(np.float32)
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        Searcher.create(Path(tmp) / "ix", layer, x, metric="cosine")
        faiss_backend = Searcher.load(Path(tmp) / "ix")
        torch_backend = Searcher.load(Path(tmp) / "ix", backend="torch")
        float_formula = TorchIVFPQ(torch_backend.tensors, "cosine")
        description = faiss_backend.describe()
        for nprobe in args.nprobe:
            reference = faiss_backend.search(xq, args.k, nprobe=nprobe)
            candidates = {
                "torch": torch_backend.search(xq, args.k, nprobe=nprobe),
                "torch, float formula": tuple(t.numpy() for t in float_formula.search(xq, args.k, nprobe)),
            }
            for name, found in candidates.items():
                rows.append({"backend": name, "nprobe": nprobe, **agreement(reference, found)})
                print(rows[-1])
    payload = {
        "items": args.items,
        "index": description,
        "metric": "cosine",
        "queries": args.queries,
        "k": args.k,
    }
    print("wrote", save_result("backend_agreement", {**payload, "rows": rows}, args.results_dir))


if __name__ == "__main__":
    main()
