"""Shared helpers of the benchmark scripts: machine description and result files."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """CPU model, core count and library versions of this run."""
    import faiss
    import numpy
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "numpy": numpy.__version__,
    }


def command_line() -> str:
    """This process's command line, as run from the repository root."""
    script = Path(sys.argv[0])
    shown = f"benchmarks/{script.name}" if script.parent.name in ("benchmarks", "") else str(script)
    return "python " + shlex.join([shown, *sys.argv[1:]])


def provenance() -> dict[str, Any]:
    """The command line, machine and date of this run, as every results file records them."""
    return {"command": command_line(), "machine": machine(), "date": time.strftime("%Y-%m-%d")}


def load_result(name: str, results_dir: Path | None = None) -> dict[str, Any]:
    """The results file ``name`` ({} when there is none)."""
    path = (results_dir or RESULTS) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _write(name: str, record: dict[str, Any], results_dir: Path | None) -> Path:
    out_dir = results_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path


def save_result(name: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``results_dir/name.json`` with the command line, machine and date added."""
    return _write(name, {**provenance(), **payload}, results_dir)


def save_part(name: str, part: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Set ``part`` of the results file ``name`` to ``payload`` with its own command line,
    machine and date, keeping the rest of the file (a script with parts that run apart)."""
    return _write(name, {**load_result(name, results_dir), part: {**provenance(), **payload}}, results_dir)


def merge_runs(
    name: str, runs: list[dict[str, Any]], key: tuple[str, ...], results_dir: Path | None = None
) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Merge freshly measured ``runs`` into the results file ``name``: its runs whose ``key``
    fields differ from every new run's are kept before them. Returns the merged runs, the
    file's commands (this one is added when it is saved) and the whole old record ({} if none)."""
    path = (results_dir or RESULTS) / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    fresh = {tuple(r[k] for k in key) for r in runs}
    kept = [r for r in old.get("runs", []) if tuple(r[k] for k in key) not in fresh]
    commands = old.get("commands", [old["command"]] if "command" in old else [])
    return kept + runs, commands, old


def add_mean_std(entry: dict[str, Any], key: str, values: list[Any]) -> None:
    """Set ``entry[key]`` to the mean of ``values`` and ``entry[key + "_std"]`` to their sample
    std (0 for a single value). Values that are not numbers (a row's index name, say) are kept
    as they are when every seed agrees, else as the list of them."""
    import numpy

    if any(isinstance(v, str) or v is None for v in values):
        entry[key] = values[0] if all(v == values[0] for v in values) else list(values)
        return
    array = numpy.asarray(values, dtype=float)
    entry[key] = float(array.mean())
    entry[f"{key}_std"] = float(array.std(ddof=1)) if len(array) > 1 else 0.0


def timed_steps_per_s(trainer: Any, batches: Any, warm: int, steps: int) -> float:
    """Training steps/s of ``trainer`` on ``batches`` over ``steps`` steps, after ``warm``
    untimed ones (which allocate the optimizer state); every rank waits for the others."""
    from poeem import distributed

    trainer.cfg.max_steps = warm
    trainer.fit(batches)
    distributed.barrier()
    trainer.cfg.max_steps = warm + steps
    started = time.perf_counter()
    trainer.fit(batches)
    distributed.barrier()
    return steps / (time.perf_counter() - started)


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows (each with "recall" and "qps") that no other row beats on both, fastest first."""
    out, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (-r["qps"], -r["recall"])):
        if row["recall"] > best:
            out.append(row)
            best = row["recall"]
    return out
