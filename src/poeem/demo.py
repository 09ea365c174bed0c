"""``poeem demo``: the original Poeem tutorial's experiment, end to end on a CPU.

Trains the same two-tower model twice on the synthetic task: without the index (then FAISS
IVF8,PQ8 is built on its item embeddings) and with the Poeem layer (coarse_K=8, D=8, K=256,
dim 64, a learned rotation, lists assigned by inner product), then prints precision@100 of exact
search, FAISS and Poeem at nprobe 1: the index the Poeem run serves by default, its index as
trained (the paper's), ready the moment training ends. The rotation is learned through a Cayley
map: the tutorial's Givens product spans the same rotations near the identity, and on this task
it cost a third to a half more training time for no better index (docs/design.md, "Learnable
rotation").
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import typer

from poeem.data import DataConfig
from poeem.errors import PoeemError
from poeem.folder_lock import LOCK_FILE
from poeem.model import ModelConfig
from poeem.pipeline.config import EvalConfig, RunConfig
from poeem.pipeline.run import train_run
from poeem.pipeline.run_dir import AS_TRAINED
from poeem.training.config import TrainConfig

RUN_FILES = {
    "config.json",
    "ids.json",
    "features.safetensors",
    "model.safetensors",
    AS_TRAINED,
    "checkpoint.safetensors",
    "metrics.json",
    "log.csv",
    "tensorboard",
    LOCK_FILE,  # left by a demo that was killed
}
TUTORIAL = {"exact": 0.9989, "faiss-ivfpq": 0.9610, "poeem": 0.9805}  # TF 1.15, 3 epochs, nprobe 1


def demo_configs(
    epochs: int, batch_size: int, num_pairs: int, seed: int, progress: bool = True
) -> tuple[RunConfig, RunConfig]:
    """(baseline, poeem) run configs of the tutorial: cosine with temperature 1/30, Adagrad 0.1."""
    data = DataConfig(kind="synthetic", num_pairs=num_pairs, seed=seed)
    warmup = epochs * -(-num_pairs // batch_size) // 3  # the first third of training
    train = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        optimizer="adagrad",
        lr=0.1,
        seed=seed,
        device="auto",
        checkpoint_every=0,
        eval_every=10**9,
        progress=progress,
    )
    ev = EvalConfig(ks=(100,), nprobes=(1,), num_coarse=8, num_subspaces=8, codebook_size=256)
    tutorial_model = {"dim": 64, "score": "cosine", "temperature": 1 / 30, "logq_correction": False}
    baseline = RunConfig(data, ModelConfig(**tutorial_model), train, ev)
    layer = {
        "num_coarse": 8,
        "num_subspaces": 8,
        "codebook_size": 256,
        "rotation": "cayley",
        "warmup_steps": warmup,
        "buffer_size": 8192,
    }
    poeem = RunConfig(
        data,
        ModelConfig(**tutorial_model, poeem=layer),
        train,
        EvalConfig(ks=(100,), nprobes=(1,), faiss_baseline=False),
    )
    return baseline, poeem


def _clear_previous_run(run_dir: Path) -> None:
    """Delete a run folder that an earlier demo wrote (it holds config.json and only run files)."""
    if not run_dir.exists():
        return
    # besides run files, an interrupted demo may leave atomic-write temporaries (.NAME.*.tmp)
    entries = (
        {p.name for p in run_dir.iterdir() if not p.name.endswith(".tmp")} if run_dir.is_dir() else {"?"}
    )
    if entries and ("config.json" not in entries or not entries <= RUN_FILES):
        raise PoeemError(
            "demo output",
            f"'{run_dir}' empty or holding an earlier demo run",
            f"other files there ({', '.join(sorted(entries - RUN_FILES)[:3]) or 'no config.json'})",
            "pass another --out",
        )
    typer.echo(f"replacing the earlier demo run in {run_dir}/")
    shutil.rmtree(run_dir)


def run_demo(
    epochs: int = 3,
    batch_size: int = 256,
    num_pairs: int = 1_000_000,
    out: Path | None = None,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float | str]]:
    """Train both models, print the comparison table, and return its rows.

    The runs go to ``out/baseline`` and ``out/poeem``; a previous demo's runs there are replaced,
    anything else there is refused."""
    out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    baseline_cfg, poeem_cfg = demo_configs(epochs, batch_size, num_pairs, seed, progress)
    for name in ("baseline", "poeem"):
        _clear_previous_run(out / name)
    steps = -(-num_pairs // batch_size)
    typer.echo(
        f"poeem demo: synthetic task, {num_pairs:,} pairs, {epochs} epochs x {steps:,} steps "
        f"of batch {batch_size} (the tutorial: 3 epochs, batch 128); runs in {out}/"
    )
    results = {}
    for name, cfg in (("baseline", baseline_cfg), ("poeem", poeem_cfg)):
        typer.echo(f"training the {name} model ...")
        _, metrics = train_run(cfg, out / name)
        results[name] = metrics
    base_rows = {r["method"]: r for r in results["baseline"]["rows"]}
    poeem_rows = {r["method"]: r for r in results["poeem"]["rows"]}
    baseline_s = results["baseline"]["train_s"]
    table = [
        ("exact (brute force)", base_rows["exact"], baseline_s, TUTORIAL["exact"]),
        ("FAISS IVF8,PQ8 (after training)", base_rows["faiss-ivfpq"], baseline_s, TUTORIAL["faiss-ivfpq"]),
        ("Poeem as trained (default)", poeem_rows["poeem"], results["poeem"]["train_s"], TUTORIAL["poeem"]),
    ]
    typer.echo("")
    header = ("method", "precision@100", "tutorial", "train s", "index build s", "served after s", "search s")
    typer.echo(f"{header[0]:32}" + "".join(f"{h:>15}" for h in header[1:]))
    rows = []
    for label, row, train_s, ref in table:
        served_s = train_s + row["build_s"]
        typer.echo(
            f"{label:32}{row['precision@100']:>15.4f}{ref:>15.4f}{train_s:>15.1f}"
            f"{row['build_s']:>15.3f}{served_s:>15.1f}{row['eval_s']:>15.2f}"
        )
        rows.append(
            {
                "method": label,
                "precision@100": row["precision@100"],
                "train_s": train_s,
                "build_s": row["build_s"],
                "served_after_s": served_s,
                "search_s": row["eval_s"],
            }
        )
    typer.echo(
        "\nprecision@100 over all 10,000 queries at nprobe 1; 'served after s': training plus the "
        "index build, the time from data to a servable index; 'search s' includes scoring the "
        "results. Index build: FAISS train+add on the trained item embeddings; Poeem as trained: "
        "the zero-training export of the codes training computed (the paper's index), as "
        "`poeem train` serves it by default; the demo keeps the tutorial's 8-bit codes, where "
        "`poeem train` defaults to 4-bit ones searched by fast scan (docs/design.md, "
        '"Codebook size").'
    )
    return rows
