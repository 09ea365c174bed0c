"""The index as trained against the index re-encoded at export.

For each seed it trains a preset's joint model once, then builds three indexes from the same
layer and evaluates each at nprobe 1 and all lists:

- ``re-encoded``: every item embedded and encoded after training (``poeem export
  --from-training none``);
- ``trained lists``: each item keeps the list of its latest training step and only its
  residual is encoded (``--from-training lists``, the default export);
- ``trained``: each item keeps the codes of its latest training step (``--from-training codes``,
  the index as trained).

Also reported: the share of items whose codes (and lists) are identical in ``trained`` and
``re-encoded``, and each export's time.

    python benchmarks/trained_codes.py --dataset ml-100k --seeds 0 1 2
    python benchmarks/trained_codes.py --dataset gowalla --seeds 0 1

Data is read from --data-dir, else $POEEM_DATA_DIR/<dataset>, else ../shared/datasets/<dataset>.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from poeem.data import load_data
from poeem.evaluation.evaluate import evaluate_retrieval
from poeem.export import build_faiss_index, learned_index
from poeem.export.item_codes import item_codes
from poeem.model.query_encoder import QueryEncoder
from poeem.pipeline.run import train_run
from poeem.search.faiss_backend import FaissSearcher

from common import add_mean_std, command_line, save_result
from presets import VARIANTS, preset, tiny

MODES = {"re-encoded": None, "trained lists": "lists", "trained": "codes"}


@torch.no_grad()
def compare(model: Any, data: Any, ks: tuple[int, ...], nprobes: tuple[int, ...]) -> dict[str, Any]:
    """Rows of the three indexes of one trained model, and how many codes the trained and the
    re-encoded ones share."""
    features = torch.from_numpy(data.item_features) if data.item_features is not None else None
    encode, rows, codes = QueryEncoder.from_model(model, data).by_rows, [], {}
    for mode, from_training in MODES.items():
        started = time.perf_counter()
        codes[mode] = item_codes(model, features, from_training=from_training)
        export_s = time.perf_counter() - started
        searcher = FaissSearcher(build_faiss_index(learned_index(model.index, codes[mode]), "ip"))
        for nprobe in nprobes:
            metrics = evaluate_retrieval(searcher, encode, data, ks, nprobe)
            rows.append({"mode": mode, "nprobe": nprobe, **metrics, "export_s": export_s})
    (coarse_a, sub_a), (coarse_b, sub_b) = codes["re-encoded"], codes["trained"]
    same = (sub_a == sub_b).all(dim=1)
    if coarse_a is not None and coarse_b is not None:
        same_list = coarse_a == coarse_b
        same &= same_list
    memory = model.index.trained
    return {
        "rows": rows,
        "same_codes": float(same.float().mean()),
        "same_list": float(same_list.float().mean()) if coarse_a is not None else None,
        "items_coded_in_training": float(memory.seen().float().mean()) if memory is not None else 0.0,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["synthetic", "ml-100k", "gowalla"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant", default="poeem-ip", choices=list(VARIANTS))
    p.add_argument("--tiny", action="store_true", help="seconds-long smoke configuration")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()

    pre = tiny(preset(args.dataset, args.data_dir)) if args.tiny else preset(args.dataset, args.data_dir)
    nprobes = (1, pre.budget[0])
    work = Path(tempfile.mkdtemp(prefix="poeem-bench-"))
    runs = []
    try:
        for seed in args.seeds:
            cfg = pre.run_config(seed, args.variant, nprobes)
            started = time.perf_counter()
            model, _ = train_run(cfg, work / f"{args.variant}-{seed}")
            print(f"{args.dataset} seed {seed}: trained in {time.perf_counter() - started:.0f}s", flush=True)
            runs.append({"seed": seed, **compare(model, load_data(cfg.data), pre.ks, nprobes)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    grouped: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        for row in run["rows"]:
            grouped[(row["mode"], row["nprobe"])].append(row)
    summary = []
    for (mode, nprobe), rows in grouped.items():
        entry: dict[str, Any] = {"mode": mode, "nprobe": nprobe, "seeds": len(rows)}
        for key in rows[0]:
            if key not in ("mode", "nprobe"):
                add_mean_std(entry, key, [r[key] for r in rows])
        summary.append(entry)
    coarse, d, k = pre.budget
    result = {
        "dataset": args.dataset,
        "variant": args.variant,
        "tiny": args.tiny,
        "headline": pre.headline,
        "budget": {"coarse_K": coarse, "D": d, "K": k, "bytes_per_item": d * (k.bit_length() - 1) / 8},
        "summary": summary,
        "runs": runs,
        "commands": [command_line()],
    }
    path = save_result(
        f"trained_codes_{args.dataset}{'_tiny' if args.tiny else ''}", result, args.results_dir
    )
    h = pre.headline
    for row in summary:
        print(f"{row['mode']:10} nprobe={row['nprobe']:<3} {h}={row[h]:.4f} ± {row[h + '_std']:.4f}")
    for run in runs:
        print(f"seed {run['seed']}: same codes {run['same_codes']:.1%}, same list {run['same_list']}")
    print("wrote", path)


if __name__ == "__main__":
    main()
