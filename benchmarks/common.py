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


def save_result(name: str, payload: dict[str, Any], results_dir: Path | None = None) -> Path:
    """Write ``results_dir/name.json`` with the command line, machine and date added."""
    out_dir = results_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command_line(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        **payload,
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return path
