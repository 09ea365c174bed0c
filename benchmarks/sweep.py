"""Recall as a function of D (bytes per item), K and coarse_K: FAISS against Poeem (RQ2).

The baseline model is trained once; FAISS IVF-PQ is built on its item embeddings for every
budget. Poeem trains the same model with the layer at every budget.

    python benchmarks/sweep.py --data-dir ../shared/datasets/gowalla
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from poeem.data import load_data
from poeem.evaluation.report import compare_indexes
from poeem.pipeline.run import train_run

from common import save_result
from presets import preset, tiny

GRID = {"D": (4, 8, 16), "K": (16, 256), "coarse_K": (4, 64)}


def budgets(
    base: tuple[int, int, int], grid: dict[str, tuple[int, ...]]
) -> list[tuple[str, int, tuple[int, int, int]]]:
    """(parameter, value, (coarse_K, D, K)) points varying one parameter of ``base`` at a time."""
    coarse, d, k = base
    points = [("D", v, (coarse, v, k)) for v in grid["D"]]
    points += [("K", v, (coarse, d, v)) for v in grid["K"]]
    return points + [("coarse_K", v, (v, d, k)) for v in grid["coarse_K"]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla", choices=["synthetic", "ml-100k", "gowalla"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    pre = preset(args.dataset, args.data_dir)
    grid = GRID
    if args.tiny:
        pre, grid = tiny(pre), {"D": (2, 4), "K": (16,), "coarse_K": (2,)}
    if args.epochs:
        pre.train.epochs = args.epochs
    h = pre.headline
    work = Path(tempfile.mkdtemp(prefix="poeem-sweep-"))
    points, trained = [], {}
    try:
        cfg = pre.run_config(args.seed, None, (1,))
        model, metrics = train_run(cfg, work / "baseline")
        data = load_data(cfg.data)
        exact = next(r[h] for r in metrics["rows"] if r["method"] == "exact")
        for param, value, budget in budgets(pre.budget, grid):
            nprobes = (1, budget[0])
            faiss_rows = compare_indexes(model, data, pre.ks, nprobes, True, budget, seed=args.seed)
            if budget not in trained:
                name = "poeem-" + "-".join(map(str, budget))
                run_cfg = replace(pre, budget=budget).run_config(args.seed, "poeem", nprobes)
                _, trained[budget] = train_run(run_cfg, work / name)
            poeem_rows = [r for r in trained[budget]["rows"] if r["method"] == "poeem"]
            _, d, k = budget
            point = {
                "parameter": param,
                "value": value,
                "budget": list(budget),
                "bytes_per_item": d * (k.bit_length() - 1) / 8,
                "faiss": [r[h] for r in faiss_rows if r["method"] == "faiss-ivfpq"],
                "poeem": [r[h] for r in poeem_rows],
            }
            points.append(point)
            print(point, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "dataset": args.dataset,
        "data": data.summary(),
        "headline": h,
        "exact": exact,
        "seed": args.seed,
        "tiny": args.tiny,
        "points": points,
    }
    print(
        "wrote", save_result(f"sweep_{args.dataset}{'_tiny' if args.tiny else ''}", result, args.results_dir)
    )


if __name__ == "__main__":
    main()
