"""Training cost of the Poeem layer: steps/s without it, with the paper's losses and with the
defaults (and the defaults with a learned rotation), and with ``--profile`` where a step's time
goes.

The models train on the same batches of the preset's data; the layer is initialised on the item
embeddings up front, so every timed step quantizes. Steps after ``--warm`` untimed ones
(optimizer state allocation) are timed; the settings take turns ``--repeats`` times and the
median is kept, so a slow minute of the machine does not land on one setting only.

    OMP_NUM_THREADS=1 python benchmarks/train_cost.py --dataset synthetic --batch-sizes 256 1024 2048
    OMP_NUM_THREADS=1 python benchmarks/train_cost.py --dataset gowalla --budget 16 16 16 --profile

``--profile`` runs each layer setting once more under ``torch.profiler`` and splits the step into
the parts below (ms per step; ``backward`` is autograd's whole pass, every part's gradient).
"""

from __future__ import annotations

import argparse
import functools
import statistics
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from poeem.data import load_data
from poeem.pipeline.run_dir import build_model, model_shapes
from poeem.training import PairBatches, Trainer

from common import command_line, merge_runs, save_result, timed_steps_per_s
from presets import PAPER_LOSSES, preset, tiny

SETTINGS: dict[str, dict[str, Any] | None] = {
    "no layer": None,
    "layer, paper losses": PAPER_LOSSES,
    "layer, defaults": {},
    "layer, defaults with the un-quantized term every step": {"unquantized_schedule": "every_step"},
    "layer, defaults, givens rotation": {"rotation": "givens"},
    "layer, defaults, cayley rotation": {"rotation": "cayley"},
}

# where a step's time goes: (part, module, attribute) of the functions timed under the profiler
PROBES: list[tuple[str, str, str]] = [
    ("item tower", "poeem.model.retrieval:RetrievalModel", "encode_items"),
    ("query tower", "poeem.model.retrieval:RetrievalModel", "encode_queries"),
    ("layer forward", "poeem.index.layer:PoeemLayer", "forward"),
    ("rotation", "poeem.index.givens:GivensRotation", "matrix"),
    ("rotation", "poeem.index.cayley:CayleyRotation", "matrix"),
    ("list and code assignment", "poeem.index.layer", "encode_rotated"),
    ("reconstruction", "poeem.index.layer", "decode_rotated"),
    ("trained codes", "poeem.index.trained_codes:TrainedCodes", "record"),
    ("routing loss", "poeem.index.layer:PoeemLayer", "routing_loss"),
    ("task loss", "poeem.model.retrieval:RetrievalModel", "_task_loss"),
]


def _model(pre: Any, data: Any, layer: dict[str, Any] | None, budget: tuple[int, ...] | None) -> Any:
    cfg = pre.run_config(0, "poeem-ip" if layer is not None else None, (1,))
    if layer is not None:
        poeem = {**cfg.model.poeem, **layer, "warmup_steps": 0}
        if budget:
            poeem |= dict(zip(("num_coarse", "num_subspaces", "codebook_size"), budget, strict=True))
        cfg = replace(cfg, model=replace(cfg.model, poeem=poeem))
    torch.manual_seed(0)
    model = build_model(cfg.model, model_shapes(data), torch.from_numpy(data.item_popularity()))
    if model.index is not None:
        model.index.initialize(model.all_item_embeddings()[: cfg.model.poeem["buffer_size"]])
    return model, cfg


def _trainer(pre: Any, data: Any, layer: dict[str, Any] | None, budget: Any, batch: int) -> tuple[Any, Any]:
    model, cfg = _model(pre, data, layer, budget)
    train = replace(cfg.train, batch_size=batch, progress=False, log="none", checkpoint_every=0)
    batches = PairBatches(data, batch, 0, "cpu", cfg.model.random_negatives)
    return Trainer(model, train), batches


def _probe(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        with record_function(label):
            return fn(*args, **kwargs)

    return timed


def _owner(spec: str) -> Any:
    import importlib

    module, _, cls = spec.partition(":")
    try:
        owner = importlib.import_module(module)
    except ImportError:  # a part an earlier version of the library does not have
        return None
    return getattr(owner, cls, None) if cls else owner


def profile_step(trainer: Any, batches: Any, warm: int, steps: int) -> dict[str, float]:
    """ms per training step in each of :data:`PROBES`, in autograd's backward pass and in the
    optimizer, over ``steps`` profiled steps after ``warm`` plain ones."""
    trainer.cfg.max_steps = trainer.step + warm
    trainer.fit(batches)
    patched = []
    for label, spec, name in PROBES:
        owner = _owner(spec)
        if owner is not None and hasattr(owner, name):
            patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, _probe(getattr(owner, name), "probe:" + label))
    trainer.cfg.max_steps = trainer.step + steps
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.fit(batches)
    finally:
        for owner, name, fn in patched:
            setattr(owner, name, fn)
    parts: dict[str, float] = {}
    total = 0.0
    for event in prof.key_averages():
        total += event.self_cpu_time_total
        key = event.key
        if key.startswith("probe:"):
            parts[key.removeprefix("probe:")] = event.cpu_time_total
        elif key.startswith("Optimizer.step"):
            parts["optimizer"] = parts.get("optimizer", 0.0) + event.cpu_time_total
        elif key.startswith("autograd::engine::evaluate_function"):
            parts["backward"] = parts.get("backward", 0.0) + event.cpu_time_total
    out = {label: us / steps / 1e3 for label, us in parts.items()}
    out["step (profiled)"] = total / steps / 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="gowalla", choices=["synthetic", "ml-100k", "gowalla"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: the preset's")
    p.add_argument("--budget", type=int, nargs=3, default=None, metavar=("LISTS", "D", "K"))
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="also split each layer setting's step")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument(
        "--code",
        default="current",
        help="a label for the library version measured (run an earlier one with PYTHONPATH)",
    )
    args = p.parse_args()
    pre = preset(args.dataset, args.data_dir)
    if args.tiny:
        pre = tiny(pre)
    data = load_data(pre.run_config(0, None, (1,)).data)
    budget = tuple(args.budget) if args.budget else pre.budget
    threads = torch.get_num_threads()
    rows = []
    for batch in args.batch_sizes or [pre.train.batch_size]:
        rates: dict[str, list[float]] = {name: [] for name in args.settings}
        for _ in range(args.repeats):
            for name in args.settings:
                trainer, batches = _trainer(pre, data, SETTINGS[name], args.budget, batch)
                rates[name].append(timed_steps_per_s(trainer, batches, args.warm, args.steps))
        base = statistics.median(rates["no layer"]) if "no layer" in rates else None
        for name in args.settings:
            rate = statistics.median(rates[name])
            row: dict[str, Any] = {
                "setting": name,
                "code": args.code,
                "batch_size": batch,
                "threads": threads,
                "budget": "lists {}, D {}, K {}".format(*budget),
                "steps_per_s": rate,
                "steps_per_s_runs": rates[name],
            }
            if base:
                row["time_vs_no_layer"] = base / rate
            if args.profile and SETTINGS[name] is not None:
                trainer, batches = _trainer(pre, data, SETTINGS[name], args.budget, batch)
                row["profile_ms"] = profile_step(trainer, batches, args.warm, max(20, args.steps // 2))
            rows.append(row)
            shown = f" ({row['time_vs_no_layer']:.2f}x)" if "time_vs_no_layer" in row else ""
            print(f"batch {batch}, {name}: {rate:.2f} steps/s{shown}", flush=True)
            for part, ms in row.get("profile_ms", {}).items():
                print(f"    {part}: {ms:.3f} ms", flush=True)
    name = f"train_cost_{args.dataset}{'_tiny' if args.tiny else ''}"
    key = ("setting", "code", "batch_size", "threads", "budget")
    merged, commands, _ = merge_runs(name, rows, key, args.results_dir)
    payload = {"dataset": args.dataset, "runs": merged, "commands": [*commands, command_line()]}
    print("wrote", save_result(name, payload, args.results_dir))


if __name__ == "__main__":
    main()
