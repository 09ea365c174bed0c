"""Ablation of the options that train the index for retrieval: each alone, then together.

Every row trains the preset's model with the Poeem layer (the ``poeem-ip`` variant: no
rotation, inner-product lists) plus one set of options, and reports the index at nprobe 1 and
over all lists, the joint model's own exact recall, the codes a query scans, the list
imbalance and the training time per epoch.

    python benchmarks/ablation.py --dataset gowalla --seeds 0
    python benchmarks/ablation.py --dataset synthetic --seeds 0 1 2 --options none default default+every-step

Rows are appended to ``results/ablation_<dataset>.json`` as they finish (a rerun of the same
(option, seed) replaces its row), so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from poeem.pipeline.run import train_run

from common import RESULTS, add_mean_std, command_line, save_result
from presets import PAPER_LOSSES, preset, tiny

# PoeemConfig fields of each option, set on top of PAPER_LOSSES (every option off)
OPTIONS: dict[str, dict[str, Any]] = {
    "none": {},
    "routing": {"routing_weight": 1.0},
    "routing-centroids": {"routing_weight": 1.0, "route_centroids": True},
    "task-grad": {"index_task_grad": True},
    "balance": {"balance_weight": 1.0},
    "reseed": {"reseed_after": 200},
    "unquantized-loss": {"unquantized_loss_weight": 1.0},
    "every-step": {"unquantized_schedule": "every_step"},  # both softmaxes every step
}


def row_options(option: str) -> dict[str, Any]:
    """PoeemConfig fields of a row: option names joined by '+', each set on top of PAPER_LOSSES
    (every option off), or on top of the current defaults when the first name is "default"."""
    names = option.split("+")
    on_defaults = names[0] == "default"
    layer = {} if on_defaults else dict(PAPER_LOSSES)
    for name in names[1:] if on_defaults else names:
        if name not in OPTIONS:
            raise SystemExit(f"unknown option {name!r}: pick from {list(OPTIONS)}, or 'default'")
        layer.update(OPTIONS[name])
    return layer


def run_row(pre: Any, seed: int, layer: dict[str, Any], work: Path) -> dict[str, Any]:
    """Train one model with the layer options ``layer`` and return its measurements."""
    nprobes = (1, pre.budget[0])
    cfg = replace(pre, layer={**pre.layer, **layer}).run_config(seed, "poeem-ip", nprobes)
    started = time.perf_counter()
    _, metrics = train_run(cfg, work)
    h = pre.headline
    rows = {r["method"] + str(r["nprobe"]): r for r in metrics["rows"]}
    row = {
        "exact_of_joint_model": rows["exact1"][h],
        "nprobe1": rows["poeem1"][h],
        "all_lists": rows[f"poeem{nprobes[1]}"][h],
        "codes_scanned_nprobe1": rows["poeem1"]["codes_scanned"],
        "imbalance": rows["poeem1"]["imbalance"],
        "train_s_per_epoch": metrics["train_s"] / pre.train.epochs,
        "wall_s": time.perf_counter() - started,
        "index_stats": metrics["index_stats"],
    }
    shutil.rmtree(work, ignore_errors=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["synthetic", "ml-100k", "gowalla"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--options",
        nargs="+",
        default=[*(name for name in OPTIONS if name != "every-step"), "default", "default+every-step"],
        help=f"rows: any of {list(OPTIONS)}, several joined by '+', or 'default' (+ options)",
    )
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    pre = preset(args.dataset, args.data_dir)
    if args.tiny:
        pre = tiny(pre)
    name = f"ablation_{args.dataset}{'_tiny' if args.tiny else ''}"
    path = (args.results_dir or RESULTS) / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    runs: list[dict[str, Any]] = old.get("runs", [])
    commands = [*old.get("commands", []), command_line()]
    work = Path(tempfile.mkdtemp(prefix="poeem-ablation-"))
    try:
        for seed in args.seeds:
            for option in args.options:
                layer = row_options(option)
                row = run_row(pre, seed, layer, work / f"{option}-{seed}")
                row.update(option=option, seed=seed, layer=layer)
                print(json.dumps({k: v for k, v in row.items() if k != "index_stats"}), flush=True)
                runs = [r for r in runs if (r["option"], r["seed"]) != (option, seed)] + [row]
                record = {"dataset": args.dataset, "headline": pre.headline, "runs": runs}
                save_result(
                    name, {**record, "summary": summarize(runs), "commands": commands}, args.results_dir
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every measurement, per option."""
    out = []
    for option in dict.fromkeys(r["option"] for r in runs):
        rows = [r for r in runs if r["option"] == option]
        entry: dict[str, Any] = {"option": option, "seeds": sorted(r["seed"] for r in rows)}
        for key in (
            "exact_of_joint_model",
            "nprobe1",
            "all_lists",
            "codes_scanned_nprobe1",
            "imbalance",
            "train_s_per_epoch",
        ):
            add_mean_std(entry, key, [r[key] for r in rows])
        out.append(entry)
    return out


if __name__ == "__main__":
    main()
