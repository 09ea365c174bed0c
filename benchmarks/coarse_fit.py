"""Coarse centroids for the inner-product list rule on items whose norms vary.

6,000 correlated Gaussian items (dim 32) with log-normal norms, IVF16 + PQ8x4, no rotation.
For each list rule and centroid fit: relative distortion of the reconstruction, empty lists
and the largest list. The data is the regression test's (tests/test_layer.py).

    python benchmarks/coarse_fit.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from poeem import PoeemLayer

from common import save_result


def varying_norm_items(n: int = 6000, dim: int = 32) -> torch.Tensor:
    """The test's data: correlated Gaussian directions with log-normal norms."""
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(1, -1, dim)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    x = (torch.randn(n, dim, generator=g) * scales) @ mix
    norms = torch.exp(torch.randn(n, 1, generator=torch.Generator().manual_seed(0)) * 0.5)
    return x / x.norm(dim=1, keepdim=True) * norms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    x = varying_norm_items()
    rows = []
    for rule, fit in (("l2", "kmeans"), ("ip", "kmeans"), ("ip", "equal_norm")):
        layer = PoeemLayer(
            dim=32,
            num_subspaces=8,
            codebook_size=16,
            num_coarse=16,
            coarse_metric=rule,
            coarse_fit=fit,
            buffer_size=6000,
        )
        layer.initialize(x)
        coarse_codes, codes = layer.encode(x)
        sizes = torch.bincount(coarse_codes.long(), minlength=16)
        distortion = float((x - layer.decode(coarse_codes, codes)).pow(2).sum() / x.pow(2).sum())
        rows.append(
            {
                "rule": rule,
                "fit": fit,
                "relative_distortion": distortion,
                "empty_lists": int((sizes == 0).sum()),
                "largest_list": int(sizes.max()),
            }
        )
        print(rows[-1])
    print("wrote", save_result("coarse_fit", {"items": len(x), "rows": rows}, args.results_dir))


if __name__ == "__main__":
    main()
