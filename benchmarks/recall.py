"""Retrieval quality at an equal code budget: exact vs FAISS (IVF-PQ, OPQ, RQ) and ScaNN vs
Poeem variants.

For each seed it trains the baseline two-tower model once (rows exact, faiss-ivfpq,
faiss-opq-ivfpq, faiss-rq: IVF + residual quantizer, and scann: tree + AH, all at the same
bytes, lists and probes, no reorder, see peers.py) and the same model with the Poeem layer in
each variant (poeem, poeem-opq, poeem-givens, poeem-no-warmstart), then reports mean and std over seeds.

    python benchmarks/recall.py --dataset synthetic --seeds 0 1 2
    python benchmarks/recall.py --dataset ml-100k --seeds 0 1 2 --data-dir ../shared/datasets/ml-100k
    python benchmarks/recall.py --dataset gowalla --seeds 0 --data-dir ../shared/datasets/gowalla

Data is read from --data-dir, else $POEEM_DATA_DIR/<dataset>, else ../shared/datasets/<dataset>.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from poeem.data import load_data
from poeem.evaluation.evaluate import evaluate_retrieval
from poeem.model.query_encoder import QueryEncoder
from poeem.pipeline.config import RunConfig
from poeem.pipeline.run import after_training_seconds, train_run
from poeem.search.faiss_backend import train_faiss_ivfpq

from common import add_mean_std, command_line, merge_runs, save_result
from peers import ScannIndex, codes_scanned, faiss_residual_index
from presets import VARIANTS, preset, tiny

ROW_ORDER = ["exact", "faiss-ivfpq", "faiss-opq-ivfpq", "faiss-rq", "scann", *VARIANTS]
DEFAULT_VARIANT = "poeem-ip"  # the layer's defaults; its list sizes and training curves are plotted


def read_curves(log: Path, names: tuple[str, ...]) -> dict[str, list[list[float]]]:
    """(step, value) series of the named metrics from a run's log.csv."""
    curves: dict[str, list[list[float]]] = defaultdict(list)
    with log.open() as f:
        for row in csv.DictReader(f):
            if row["name"] in names:
                curves[row["name"]].append([int(row["step"]), float(row["value"])])
    return dict(curves)


def list_sizes_poeem(model: Any) -> list[int]:
    """Items per inverted list of the learned index."""
    coarse_codes, _ = model.index.encode(model.all_item_embeddings())
    return np.bincount(coarse_codes.long().numpy(), minlength=model.index.config.num_coarse).tolist()


def list_sizes_faiss(xb: torch.Tensor, budget: tuple[int, int, int], seed: int) -> list[int]:
    """Items per inverted list of FAISS IVF-PQ trained on the same embeddings."""
    index = train_faiss_ivfpq(xb, *budget, metric="ip", seed=seed)  # keep it alive while ivf is used
    ivf = faiss.extract_index_ivf(index)
    return [ivf.invlists.list_size(i) for i in range(ivf.nlist)]


def peer_rows(
    model: Any,
    data: Any,
    budget: tuple[int, int, int],
    ks: tuple[int, ...],
    nprobes: tuple[int, ...],
    seed: int,
) -> list[dict[str, Any]]:
    """The peers built on the baseline model's embeddings (FAISS RQ, ScaNN), one row per method
    and nprobe, with the codes a test query scans on its real routing."""
    items = model.all_item_embeddings()
    builders = {
        "faiss-rq": lambda: faiss_residual_index(items, *budget, seed=seed),
        "scann": lambda: ScannIndex(items, *budget),
    }
    encode, rows = QueryEncoder.from_model(model, data).by_rows, []
    test = encode(data.eval_queries())
    for method, build in builders.items():
        started = time.perf_counter()
        index = build()
        build_s = time.perf_counter() - started
        for nprobe in nprobes:
            started = time.perf_counter()
            metrics = evaluate_retrieval(index, encode, data, ks, nprobe)
            rows.append({"method": method, "nprobe": nprobe, **metrics, "build_s": build_s})
            rows[-1]["eval_s"] = time.perf_counter() - started
            rows[-1]["codes_scanned"] = codes_scanned(index, test, nprobe)
    return rows


def one_run(cfg: RunConfig, work: Path, name: str) -> tuple[Any, dict[str, Any]]:
    started = time.perf_counter()
    model, metrics = train_run(cfg, work / name)
    print(f"  {name}: {time.perf_counter() - started:.0f}s", flush=True)
    return model, metrics


def train_variant(
    pre: Any, seed: int, variant: str, nprobes: tuple[int, ...], work: Path, runs: list[dict[str, Any]]
) -> Any:
    """Train one Poeem variant, append its run record to ``runs``, return the model."""
    model, metrics = one_run(pre.run_config(seed, variant, nprobes), work, f"{variant}-{seed}")
    # a refit's index is built after training: the refit and its distillation count as its build
    after_s = after_training_seconds(metrics)
    runs.append(
        {
            "seed": seed,
            "variant": variant,
            "rows": [
                dict(r, method=variant, build_s=r["build_s"] + after_s)
                for r in metrics["rows"]
                if r["method"] == "poeem"
            ],
            "exact_of_joint_model": next(r for r in metrics["rows"] if r["method"] == "exact"),
            "train_s_per_epoch": metrics["train_s"] / pre.train.epochs,
            "index_stats": metrics["index_stats"],
        }
    )
    return model


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of each (row, nprobe, metric)."""
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        for row in run["rows"]:
            grouped[(row["method"], row["nprobe"])].append(row)
    out = []
    for (method, nprobe), rows in sorted(
        grouped.items(), key=lambda kv: (ROW_ORDER.index(kv[0][0]), kv[0][1])
    ):
        entry: dict[str, Any] = {"method": method, "nprobe": nprobe, "seeds": len(rows)}
        for key in rows[0]:
            if key in ("method", "nprobe"):
                continue
            add_mean_std(entry, key, [r[key] for r in rows])
        out.append(entry)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["synthetic", "ml-100k", "gowalla"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--nprobes", type=int, nargs="+", default=None, help="default: powers of two up to all lists"
    )
    p.add_argument(
        "--num-subspaces",
        type=int,
        default=None,
        help="override the preset's D (bytes per item at K=256); results go to recall_<dataset>_D<D>",
    )
    p.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="the layer variants to train; none (a bare --variants) with --merge --baseline: the "
        "baseline and its peers only",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the (seed, variant) runs trained now into the existing results file; "
        "without --baseline only --variants are trained",
    )
    p.add_argument("--baseline", action="store_true", help="with --merge: also train the baseline")
    args = p.parse_args()

    pre = preset(args.dataset, args.data_dir)
    if args.tiny:
        pre = tiny(pre)
    if args.epochs:
        pre.train.epochs = args.epochs
    if args.num_subspaces:
        pre.budget = (pre.budget[0], args.num_subspaces, pre.budget[2])
    nprobes = tuple(args.nprobes or [2**i for i in range(pre.budget[0].bit_length()) if 2**i < pre.budget[0]])
    nprobes = tuple(sorted({*nprobes, pre.budget[0]})) if not args.nprobes else nprobes
    work = Path(tempfile.mkdtemp(prefix="poeem-bench-"))
    runs, curves, sizes = [], {}, {}
    try:
        for seed in args.seeds:
            print(f"{args.dataset} seed {seed}", flush=True)
            if args.merge and not args.baseline:
                for variant in args.variants:
                    train_variant(pre, seed, variant, nprobes, work, runs)
                continue
            cfg = pre.run_config(seed, None, nprobes)
            cfg.eval.faiss_baseline = cfg.eval.opq_baseline = True
            model, metrics = one_run(cfg, work, f"baseline-{seed}")
            with torch.no_grad():
                peer = peer_rows(model, load_data(cfg.data), pre.budget, pre.ks, nprobes, seed)
            runs.append(
                {
                    "seed": seed,
                    "variant": "baseline",
                    "rows": metrics["rows"] + peer,
                    "train_s_per_epoch": metrics["train_s"] / pre.train.epochs,
                }
            )
            if seed == args.seeds[0]:
                sizes["faiss-ivfpq"] = list_sizes_faiss(model.all_item_embeddings(), pre.budget, seed)
            for variant in args.variants:
                model = train_variant(pre, seed, variant, nprobes, work, runs)
                if seed == args.seeds[0] and variant == DEFAULT_VARIANT:
                    curves = read_curves(
                        work / f"{variant}-{seed}" / "log.csv",
                        ("relative_distortion", "subcode_perplexity", "coarse_perplexity", "task_loss"),
                    )
                    sizes[variant] = list_sizes_poeem(model)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    suffix = f"_D{args.num_subspaces}" if args.num_subspaces else ""
    name = f"recall_{args.dataset}{suffix}{'_tiny' if args.tiny else ''}"
    commands = []
    if args.merge:  # keep the other rows, curves and list sizes of the existing results
        runs, commands, old = merge_runs(name, runs, ("seed", "variant"), args.results_dir)
        curves, sizes = curves or old.get("curves", {}), sizes or old.get("list_sizes", {})
    data = load_data(pre.run_config(args.seeds[0], None, nprobes).data)
    coarse, d, k = pre.budget
    epoch_time = defaultdict(list)
    for run in runs:
        epoch_time[run["variant"]].append(run["train_s_per_epoch"])
    result = {
        "dataset": args.dataset,
        "data": data.summary(),
        "num_eval_queries": len(data.eval_queries()),
        "seeds": sorted({r["seed"] for r in runs}),
        "tiny": args.tiny,
        "headline": pre.headline,
        "budget": {"coarse_K": coarse, "D": d, "K": k, "bytes_per_item": d * (k.bit_length() - 1) / 8},
        "preset": {
            "model": pre.model.to_dict(),
            "train": {k_: v for k_, v in vars(pre.train).items()},
            "layer": pre.layer,
            "warmup_fraction": pre.warmup_fraction,
        },
        "summary": summarize(runs),
        "train_s_per_epoch": {k_: float(np.mean(v)) for k_, v in epoch_time.items()},
        "runs": runs,
        "curves": curves,
        "list_sizes": sizes,
        "commands": [*commands, command_line()],
    }
    path = save_result(name, result, args.results_dir)
    for row in result["summary"]:
        h = pre.headline
        print(f"{row['method']:20} nprobe={row['nprobe']:<3} {h}={row[h]:.4f} ± {row[h + '_std']:.4f}")
    print("wrote", path)


if __name__ == "__main__":
    main()
