"""Index build time: poeem's zero-training export against FAISS train + add, same run.

Both build IVF{nlist},PQ{m}x{nbits} over the same n x dim item embeddings. poeem's codebooks
come from a layer fitted on a sample (standing in for the trained layer); its export copies
them and the item codes into FAISS. Two poeem timings are reported: from the codes training
already computed (what the paper calls indexing) and from raw embeddings (encode + export).

    python benchmarks/export_speed.py            # 1,000,000 x 64, IVF1024,PQ8x8
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import torch

from poeem import PoeemLayer
from poeem.export import build_faiss_index, learned_index
from poeem.search.faiss_backend import untrained_faiss_index

from common import save_result


def clustered_embeddings(n: int, dim: int, seed: int) -> torch.Tensor:
    """(n, dim) unit vectors around 4096 random centres, like trained item embeddings."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4096, dim, generator=g)
    x = centres[torch.randint(4096, (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--nbits", type=int, default=8)
    p.add_argument("--fit-sample", type=int, default=100_000, help="rows the stand-in layer is fitted on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    x = clustered_embeddings(args.n, args.dim, args.seed)
    k = 1 << args.nbits
    layer = PoeemLayer(
        dim=args.dim,
        num_subspaces=args.m,
        codebook_size=k,
        num_coarse=args.nlist,
        warmup_steps=0,
        buffer_size=max(k, args.nlist),
        kmeans_iters=10,
    )
    layer.initialize(x[: args.fit_sample], progress=True)
    codes = layer.encode(x)  # what training computed for every item

    t = time.perf_counter()
    index = build_faiss_index(learned_index(layer, codes), "ip")
    export_from_codes = time.perf_counter() - t
    assert index.ntotal == args.n

    t = time.perf_counter()
    index = build_faiss_index(learned_index(layer, x), "ip")
    export_from_embeddings = time.perf_counter() - t

    xb = x.numpy()
    t = time.perf_counter()
    spec = f"IVF{args.nlist},PQ{args.m}x{args.nbits}"
    baseline = untrained_faiss_index(args.dim, spec, "ip", args.seed)
    baseline.train(xb)
    trained = time.perf_counter() - t
    baseline.add(xb)
    faiss_total = time.perf_counter() - t

    result = {
        "config": vars(args) | {"results_dir": None},
        "faiss_train_s": trained,
        "faiss_train_add_s": faiss_total,
        "poeem_export_from_codes_s": export_from_codes,
        "poeem_export_from_embeddings_s": export_from_embeddings,
        "speedup_from_codes": faiss_total / export_from_codes,
        "speedup_from_embeddings": faiss_total / export_from_embeddings,
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
    print("wrote", save_result("export_speed", result, args.results_dir))


if __name__ == "__main__":
    main()
