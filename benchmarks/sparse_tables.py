"""Does training the id tables with a sparse optimizer keep the quality?

For each dataset preset and seed it trains the baseline model and the default Poeem variant
with the preset's dense optimizer, and again with the id tables on a sparse optimizer (the rest
of the model keeps the preset's optimizer), and reports exact recall, the index's recall at
nprobe 1 and over all lists, and the seconds per epoch.

    python benchmarks/sparse_tables.py --dataset ml-100k --seeds 0 1 2
    python benchmarks/sparse_tables.py --dataset gowalla --seeds 0 --table-optimizers dense rowwise_adagrad
    python benchmarks/sparse_tables.py --dataset ml-100k --table-optimizers rowwise_adagrad \
        rowwise_adagrad_bf16 --suffix _bf16

``rowwise_adagrad_bf16`` is row-wise Adagrad on bfloat16 tables (``table_dtype``), stochastic rounding.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import add_mean_std, save_result
from presets import preset, tiny
from recall import DEFAULT_VARIANT, one_run

TABLE_SETTINGS = ("dense", "sparse_adam", "rowwise_adagrad", "rowwise_adagrad_bf16")


def table_setting(name: str, table_lr: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (TrainConfig, ModelConfig) fields of one table setting; row-wise Adagrad gets ``table_lr``."""
    if name == "dense":
        return {"table_optimizer": "dense"}, {}
    if name == "sparse_adam":
        return {"table_optimizer": name, "table_lr": None}, {}
    dtype = {"rowwise_adagrad": "float32", "rowwise_adagrad_bf16": "bfloat16"}[name]
    return {"table_optimizer": "rowwise_adagrad", "table_lr": table_lr}, {"table_dtype": dtype}


def headline_rows(metrics: dict[str, Any], headline: str, method: str) -> dict[str, float]:
    """The headline metric of ``method`` at its smallest and largest nprobe."""
    rows = sorted((r for r in metrics["rows"] if r["method"] == method), key=lambda r: r["nprobe"])
    if method == "exact":
        return {"exact": rows[0][headline]}
    return {f"{method}@{rows[0]['nprobe']}": rows[0][headline], f"{method}@all": rows[-1][headline]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["synthetic", "ml-100k", "gowalla"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--table-optimizers", nargs="+", default=list(TABLE_SETTINGS[:3]), choices=TABLE_SETTINGS)
    p.add_argument("--table-lr", type=float, default=0.05, help="row-wise Adagrad's learning rate")
    p.add_argument(
        "--models", nargs="+", default=["baseline", DEFAULT_VARIANT], choices=["baseline", DEFAULT_VARIANT]
    )
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--suffix", default="", help="appended to the results file's name")
    args = p.parse_args()

    pre = tiny(preset(args.dataset, args.data_dir)) if args.tiny else preset(args.dataset, args.data_dir)
    coarse = pre.budget[0]
    nprobes = (1, coarse)
    work = Path(tempfile.mkdtemp(prefix="poeem-sparse-"))
    runs: list[dict[str, Any]] = []
    try:
        for seed in args.seeds:
            for name in args.table_optimizers:
                train_setting, model_setting = table_setting(name, args.table_lr)
                for variant in [None if m == "baseline" else m for m in args.models]:
                    cfg = pre.run_config(seed, variant, nprobes)
                    cfg = replace(
                        cfg,
                        train=replace(cfg.train, **train_setting),
                        model=replace(cfg.model, **model_setting),
                    )
                    label = f"{variant or 'baseline'}-{name}-{seed}"
                    _, metrics = one_run(cfg, work, label)
                    method = "exact" if variant is None else "poeem"
                    run = {"seed": seed, "table_optimizer": name, "model": variant or "baseline"}
                    run |= headline_rows(metrics, pre.headline, method)
                    run["train_s_per_epoch"] = metrics["train_s"] / pre.train.epochs
                    runs.append(run)
                    print(f"  {run}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = []
    for name in args.table_optimizers:
        for model in args.models:
            group = [r for r in runs if r["table_optimizer"] == name and r["model"] == model]
            entry: dict[str, Any] = {"table_optimizer": name, "model": model, "seeds": len(group)}
            for key in group[0]:
                if key not in ("seed", "table_optimizer", "model"):
                    add_mean_std(entry, key, [r[key] for r in group])
            summary.append(entry)
    result = {
        "dataset": args.dataset,
        "headline": pre.headline,
        "budget": {"coarse_K": coarse, "D": pre.budget[1], "K": pre.budget[2]},
        "dense_optimizer": {"name": pre.train.optimizer, "lr": pre.train.lr},
        "rowwise_adagrad_lr": args.table_lr,
        "tiny": args.tiny,
        "summary": summary,
        "runs": runs,
    }
    name = f"sparse_tables_{args.dataset}{args.suffix}{'_tiny' if args.tiny else ''}"
    print("wrote", save_result(name, result, args.results_dir))


if __name__ == "__main__":
    main()
