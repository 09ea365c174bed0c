"""How the layer's lists are fitted and trained, measured by what they route: recall at every
nprobe and list balance, against FAISS k-means lists on the same model's item embeddings.

Each variant is the frontier's default index (K = 16, 2D sub-codes, FAISS's guideline of lists)
with layer settings changed; ``faiss-ivfpq`` (k-means lists and codes at the same bytes, fitted
on the variant's own final item embeddings) is the reference every row is read against.

    python benchmarks/lists.py --dataset ml-100k --seeds 0 1 2
    python benchmarks/lists.py --dataset gowalla --seeds 0 --variants batches items+frozen

Writes ``results/lists_<dataset>.json``: per variant and nprobe the headline metric, the codes
a query scans, the largest list and the std of list sizes (mean and std over seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

from poeem.data import load_data
from poeem.pipeline.run import train_run

from common import add_mean_std, command_line, merge_runs, save_result
from frontier import guideline_lists, poeem_config
from presets import preset, tiny

VARIANTS: dict[str, dict[str, Any]] = {
    "batches": {"warm_start_sample": "batches", "list_lr_scale": 1.0},  # the paper's warm start
    "items": {"warm_start_sample": "items", "list_lr_scale": 1.0},
    "items+slow": {"warm_start_sample": "items", "list_lr_scale": 0.1},
    "items+0.03": {"warm_start_sample": "items", "list_lr_scale": 0.03},
    "items+0.01": {"warm_start_sample": "items", "list_lr_scale": 0.01},
    "items+frozen": {"warm_start_sample": "items", "list_lr_scale": 0.0},
    "default": {},  # each item once, lists at a share of the rate by their size
    "batches+frozen": {"warm_start_sample": "batches", "list_lr_scale": 0.0},
    "default+distill": {"train": {"distill_epochs": 10}},  # then distilled from its own ranking
}
KEPT = ("codes_scanned", "largest_list", "list_size_std", "imbalance")


def one_run(pre: Any, seed: int, lists: int, d: int, variant: str, work: Path) -> list[dict[str, Any]]:
    """The evaluation rows of one variant and seed: poeem and faiss-ivfpq at every nprobe."""
    cfg = poeem_config(pre, seed, (lists, 2 * d, 16), None, None)
    settings = dict(VARIANTS[variant])
    cfg.train = replace(cfg.train, **settings.pop("train", {}))
    cfg.model.poeem.update(settings)
    nprobes = tuple(2**i for i in range(lists.bit_length()))
    cfg.eval = replace(cfg.eval, nprobes=nprobes, faiss_baseline=True, num_subspaces=2 * d, codebook_size=16)
    _, metrics = train_run(cfg, work / f"{variant}-{seed}")
    rows = []
    for row in metrics["rows"]:
        if row["method"] in ("poeem", "faiss-ivfpq"):
            kept = {k: row[k] for k in KEPT if k in row}
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "method": row["method"],
                    "nprobe": row["nprobe"],
                    "recall": row[pre.headline],
                    **kept,
                }
            )
    return rows


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of each (variant, method, nprobe)."""
    grouped: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        grouped[(r["variant"], r["method"], r["nprobe"])].append(r)
    out = []
    for (variant, method, nprobe), rows in grouped.items():
        entry: dict[str, Any] = {"variant": variant, "method": method, "nprobe": nprobe, "seeds": len(rows)}
        for key in ("recall", *KEPT):
            if key in rows[0]:
                add_mean_std(entry, key, [r[key] for r in rows])
        out.append(entry)
    order = list(VARIANTS)
    return sorted(out, key=lambda e: (order.index(e["variant"]), e["method"], e["nprobe"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["synthetic", "ml-100k", "gowalla", "yelp2018"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--num-subspaces", type=int, default=8, help="D: bytes per item")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    pre = preset(args.dataset, args.data_dir)
    if args.tiny:
        pre = tiny(pre)
    num_items = load_data(pre.run_config(args.seeds[0], None, (1,)).data).num_items
    lists = 4 if args.tiny else guideline_lists(num_items)
    d = 2 if args.tiny else args.num_subspaces
    print(f"{args.dataset}: {num_items} items, {lists} lists, {d} bytes per item", flush=True)
    work = Path(tempfile.mkdtemp(prefix="poeem-lists-"))
    runs = []
    try:
        for seed in args.seeds:
            for variant in args.variants:
                rows = one_run(pre, seed, lists, d, variant, work)
                runs += rows
                shown = [f"{r['nprobe']}:{r['recall']:.4f}" for r in rows if r["method"] == "poeem"]
                print(f"seed {seed} {variant}: {' '.join(shown)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = f"lists_{args.dataset}{'_tiny' if args.tiny else ''}"
    merged, commands, _ = merge_runs(name, runs, ("variant", "seed", "method", "nprobe"), args.results_dir)
    payload = {
        "dataset": args.dataset,
        "headline": pre.headline,
        "lists": lists,
        "bytes_per_item": d,
        "summary": summary(merged),
        "runs": merged,
        "commands": [*commands, command_line()],
    }
    print("wrote", save_result(name, payload, args.results_dir))
    print(json.dumps([e for e in summary(runs) if e["nprobe"] in (1, lists)], indent=1)[:3000])


if __name__ == "__main__":
    main()
