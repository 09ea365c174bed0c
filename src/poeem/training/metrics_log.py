"""Metric logs: a CSV file (always readable) or TensorBoard (when installed)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from poeem.errors import PoeemError


class MetricsLog:
    """Appends ``(step, name, value)`` rows to ``log.csv``, or writes TensorBoard scalars."""

    def __init__(self, run_dir: Path, kind: str) -> None:
        self.kind = kind
        self._csv: Any = None
        self._tb: Any = None
        if kind == "csv":
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / "log.csv"
            new = not path.exists()
            self._file = path.open("a", newline="")
            self._csv = csv.writer(self._file)
            if new:
                self._csv.writerow(["step", "name", "value"])
        elif kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PoeemError(
                    "--logger tensorboard",
                    "the tensorboard package",
                    "not installed",
                    "pip install tensorboard, or use --logger csv",
                ) from None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        elif kind != "none":
            raise PoeemError("log", "'csv', 'tensorboard' or 'none'", repr(kind), "pick one")

    def write(self, step: int, values: dict[str, float]) -> None:
        """Record scalar values at a step."""
        for name, value in values.items():
            if self._csv is not None:
                self._csv.writerow([step, name, f"{value:.6g}"])
            if self._tb is not None:
                self._tb.add_scalar(name, value, step)

    def close(self) -> None:
        """Flush and close."""
        if self._csv is not None:
            self._file.close()
            self._csv = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
