"""Exported recall of a run whose id tables are sharded over 2 processes, against the same run in
one process: ``poeem train`` on MovieLens 100K (the frontier's settings, the layer's defaults,
row-wise Adagrad on the tables), once with ``--nproc 2 --table-sharding torchrec`` and once in
one process, for each seed; the recall of the index each run serves, read from its
``metrics.json``. The same seed and global batch train the same model, so the two should agree
within the seed-to-seed spread.

    python benchmarks/table_sharding.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import save_result
from presets import data_dir

RUN = (
    *("--split", "random", "--test-fraction", "0.2", "--dim", "64", "--score", "cosine"),
    *("--temperature", "0.1", "--logq", "--epochs", "20", "--batch-size", "1024", "--optimizer", "adam"),
    *("--lr", "5e-3", "--poeem", "--table-optimizer", "rowwise_adagrad", "--table-lr", "0.05"),
    *("--no-progress", "--logger", "none", "--checkpoint-every", "0", "--eval-every", "1000000000"),
)


def train(run_dir: Path, data: str, seed: int, sharded: bool) -> dict[str, Any]:
    """The rows of ``metrics.json`` of one ``poeem train`` run."""
    extra = ["--nproc", "2", "--table-sharding", "torchrec"] if sharded else []
    command = [sys.executable, "-m", "poeem", "train", "--run-dir", str(run_dir), "--data", "movielens"]
    command += ["--data-path", data, *RUN, "--seed", str(seed), *extra]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "metrics.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-path", default=None, help="MovieLens 100K (default: ../shared/datasets/ml-100k)")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    data = data_dir("ml-100k", args.data_path)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for sharded in (False, True):
                metrics = train(Path(tmp) / f"{seed}-{sharded}", data, seed, sharded)
                for row in metrics["rows"]:
                    if row["method"] in ("exact", "poeem"):
                        rows.append({"seed": seed, "sharded": sharded, **row, "train_s": metrics["train_s"]})
                served = next(r for r in metrics["rows"] if r["method"] == "poeem")
                print(f"seed {seed}, sharded {sharded}: recall@20 {served['recall@20']:.4f}", flush=True)
    result = {"config": {"run": list(RUN), "seeds": args.seeds, "data": "ml-100k"}, "rows": rows}
    print("wrote", save_result("table_sharding", result, args.results_dir))


if __name__ == "__main__":
    main()
