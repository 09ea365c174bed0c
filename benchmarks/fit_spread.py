"""How much an index fitted and distilled after training moves with its seeds alone: the
preset's model is trained once without the layer; then, once per ``--fit-seeds`` seed, an index
is fitted on its item embeddings by k-means and distilled from its training queries
(``poeem distill --items --queries``, the recipe a text run's after-training stage applies),
with that seed for the k-means fit and the distillation's order. The headline metric at every
power-of-two nprobe, per seed, with the mean and std over seeds: the spread a comparison of one
such index against another must exceed.

    python benchmarks/fit_spread.py --dataset scifact --num-subspaces 16 --fit-seeds 0 1 2 3

Writes ``results/fit_spread_<dataset>[_D<bytes>].json``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from poeem.data import load_data
from poeem.evaluation.evaluate import evaluate_retrieval

from common import add_mean_std, command_line, save_result
from frontier import baseline_reference, distilled_items, guideline_lists
from presets import preset, tiny


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset", required=True, choices=["synthetic", "ml-100k", "gowalla", "yelp2018", "scifact"]
    )
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0, help="the model's training seed")
    p.add_argument("--fit-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--num-subspaces", type=int, default=None, help="D: bytes per item (default 8)")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    pre = preset(args.dataset, args.data_dir)
    if args.tiny:
        pre = tiny(pre)
    d = args.num_subspaces or (4 if args.tiny else 8)
    num_items = load_data(pre.run_config(args.seed, None, (1,)).data).num_items
    lists = 4 if args.tiny else guideline_lists(num_items)
    k = int(pre.headline.split("@")[1])
    nprobes = [2**i for i in range(lists.bit_length())]
    work = Path(tempfile.mkdtemp(prefix="poeem-fit-spread-"))
    runs: list[dict[str, Any]] = []
    try:
        data, encode, items, exact, _ = baseline_reference(pre, args.seed, lists, d, work)
        for fit_seed in args.fit_seeds:
            out = work / f"items-{fit_seed}"
            index = distilled_items(
                encode, np.unique(data.train_queries), items, (lists, d, fit_seed), out, fit_seed
            )
            row = {n: evaluate_retrieval(index, encode, data, (k,), n)[pre.headline] for n in nprobes}
            runs += [{"fit_seed": fit_seed, "nprobe": n, "recall": v} for n, v in row.items()]
            print(f"fit seed {fit_seed}: " + " ".join(f"{n}:{v:.4f}" for n, v in row.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = []
    for n in nprobes:
        entry: dict[str, Any] = {"nprobe": n, "seeds": len(args.fit_seeds)}
        add_mean_std(entry, "recall", [r["recall"] for r in runs if r["nprobe"] == n])
        summary.append(entry)
    suffix = f"_D{args.num_subspaces}" if args.num_subspaces else ""
    name = f"fit_spread_{args.dataset}{suffix}{'_tiny' if args.tiny else ''}"
    payload = {
        "dataset": args.dataset,
        "headline": pre.headline,
        "model_seed": args.seed,
        "lists": lists,
        "bytes_per_item": d,
        "exact": exact["recall"],
        "summary": summary,
        "runs": runs,
        "commands": [command_line()],
    }
    print("wrote", save_result(name, payload, args.results_dir))


if __name__ == "__main__":
    main()
