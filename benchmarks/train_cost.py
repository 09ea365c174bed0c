"""Training cost of the Poeem layer: steps/s without it, with the paper's losses, with the defaults
(and with the defaults scoring the un-quantized items every step, not in turn).

The models train on the same batches of the preset's data, one after the other in this
process; the layer is initialised on the item embeddings up front, so every timed step
quantizes. Steps after ``--warm`` untimed ones (optimizer state allocation) are timed.

    python benchmarks/train_cost.py --dataset gowalla
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from poeem.data import load_data
from poeem.pipeline.run_dir import build_model, model_shapes
from poeem.training import PairBatches, Trainer

from common import save_result, timed_steps_per_s
from presets import PAPER_LOSSES, preset, tiny

SETTINGS = {
    "no layer": None,
    "layer, paper losses": PAPER_LOSSES,
    "layer, defaults": {},
    "layer, defaults with the un-quantized term every step": {"unquantized_schedule": "every_step"},
}


def steps_per_s(pre: Any, data: Any, layer: dict[str, Any] | None, steps: int, warm: int) -> float:
    """Training steps/s of the preset's model with ``layer`` options (None: no layer)."""
    cfg = pre.run_config(0, "poeem-ip" if layer is not None else None, (1,))
    if layer is not None:
        cfg = replace(cfg, model=replace(cfg.model, poeem={**cfg.model.poeem, **layer, "warmup_steps": 0}))
    torch.manual_seed(0)
    model = build_model(cfg.model, model_shapes(data), torch.from_numpy(data.item_popularity()))
    if model.index is not None:
        model.index.initialize(model.all_item_embeddings()[: cfg.model.poeem["buffer_size"]])
    train = replace(cfg.train, progress=False, log="none", checkpoint_every=0)
    batches = PairBatches(data, train.batch_size, 0, "cpu", cfg.model.random_negatives)
    return timed_steps_per_s(Trainer(model, train), batches, warm, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla", choices=["synthetic", "ml-100k", "gowalla"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    pre = preset(args.dataset, args.data_dir)
    if args.tiny:
        pre = tiny(pre)
    data = load_data(pre.run_config(0, None, (1,)).data)
    rows = []
    for name, layer in SETTINGS.items():
        rate = steps_per_s(pre, data, layer, args.steps, args.warm)
        rows.append({"setting": name, "steps_per_s": rate, "batch_size": pre.train.batch_size})
        print(f"{name}: {rate:.2f} steps/s", flush=True)
    base = rows[0]["steps_per_s"]
    for row in rows:
        row["time_vs_no_layer"] = base / row["steps_per_s"]
    name = f"train_cost_{args.dataset}{'_tiny' if args.tiny else ''}"
    print(
        "wrote",
        save_result(
            name,
            {"dataset": args.dataset, "threads": torch.get_num_threads(), "rows": rows},
            args.results_dir,
        ),
    )


if __name__ == "__main__":
    main()
