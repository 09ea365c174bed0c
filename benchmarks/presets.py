"""Per-dataset settings of the benchmarks: data, model, training and the code budget.

Each preset is what we found to work for the *baseline* (un-quantized) model; the Poeem
variants reuse it unchanged, so every row compares the same architecture, dim, epochs and seed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from poeem.data import DataConfig
from poeem.model import ModelConfig
from poeem.model.config import DEFAULT_ENCODER
from poeem.pipeline.config import EvalConfig, RunConfig
from poeem.training import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@dataclass
class Preset:
    """A dataset's benchmark setting."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    budget: tuple[int, int, int]  # (coarse_K, D, K)
    ks: tuple[int, ...] = (20, 50, 100)
    headline: str = "recall@20"
    layer: dict[str, Any] = field(default_factory=dict)  # extra PoeemConfig fields
    warmup_fraction: float = 1 / 3  # of all training steps
    buffer_size: int = 8192  # warm-start buffer (at least 4 K)
    kmeans_points_per_list: int = 40  # the frontier's buffer holds at least this many per list

    def run_config(self, seed: int, variant: str | None, nprobes: tuple[int, ...]) -> RunConfig:
        """The RunConfig of one row: ``variant`` None = baseline, else a poeem variant."""
        steps = self.train.epochs * -(-_num_pairs(self) // self.train.batch_size)
        poeem = None
        if variant is not None:
            coarse, d, k = self.budget
            poeem = {
                "num_coarse": coarse,
                "num_subspaces": d,
                "codebook_size": k,
                "warmup_steps": int(steps * self.warmup_fraction),
                "buffer_size": max(self.buffer_size, 4 * k),
                **self.layer,
                **VARIANTS[variant],
            }
            if variant == "poeem-no-warmstart":
                poeem["buffer_size"] = max(k, coarse)
        return RunConfig(
            data=replace(self.data, seed=seed),
            model=replace(self.model, poeem=poeem),
            train=replace(self.train, seed=seed, refit=REFITS.get(variant or "")),
            eval=EvalConfig(
                ks=self.ks,
                nprobes=nprobes,
                faiss_baseline=False,
                num_coarse=self.budget[0],
                num_subspaces=self.budget[1],
                codebook_size=self.budget[2],
            ),
        )


# the paper's losses only (distortion regularizer + straight-through estimator): every option
# that trains the index for retrieval (docs/design.md) off
PAPER_LOSSES: dict[str, Any] = {
    "routing_weight": 0.0,
    "route_centroids": False,
    "index_task_grad": False,
    "balance_weight": 0.0,
    "reseed_after": 0,
    "unquantized_loss_weight": 0.0,
}
# the "poeem*" variants with L2 lists reproduce the paper's layer; the "-ip" ones use the
# layer's defaults (inner-product lists and the retrieval options)
VARIANTS: dict[str, dict[str, Any]] = {
    "poeem": {"rotation": "none", "coarse_metric": "l2", **PAPER_LOSSES},
    "poeem-opq": {"rotation": "opq", "coarse_metric": "l2", **PAPER_LOSSES},
    "poeem-givens": {"rotation": "givens", "coarse_metric": "l2", **PAPER_LOSSES},
    "poeem-no-warmstart": {
        "rotation": "none",
        "warmup_steps": 0,
        "init": "random",
        "coarse_metric": "l2",
        **PAPER_LOSSES,
    },
    "poeem-ip": {"rotation": "none", "coarse_metric": "ip"},
    "poeem-givens-ip": {"rotation": "givens", "coarse_metric": "ip"},
    # the layer's defaults with a residual quantizer in place of PQ (same bytes)
    "poeem-rq": {"rotation": "none", "coarse_metric": "ip", "quantizer": "rq"},
    # the defaults, then the coder refitted as a residual quantizer in the trained lists and
    # distilled (train.refit "rq")
    "poeem-ip-refit-rq": {"rotation": "none", "coarse_metric": "ip"},
}
REFITS: dict[str, str] = {"poeem-ip-refit-rq": "rq"}  # variant -> train.refit

_PAIRS: dict[str, int] = {}


def _num_pairs(p: Preset) -> int:
    if p.data.kind == "synthetic":
        return p.data.num_pairs
    key = f"{p.data.kind}:{p.data.path}"
    if key not in _PAIRS:
        from poeem.data import load_data

        _PAIRS[key] = load_data(p.data).num_train
    return _PAIRS[key]


def data_dir(name: str, given: str | None) -> str:
    """--data-dir, else $POEEM_DATA_DIR/<name>, else ../shared/datasets/<name>."""
    if given:
        return given
    root = os.environ.get("POEEM_DATA_DIR")
    return str(Path(root) / name if root else SHARED / name)


def quiet_training(**kwargs: Any) -> TrainConfig:
    """A TrainConfig that evaluates and checkpoints only at the end and shows no progress bar."""
    return TrainConfig(checkpoint_every=0, eval_every=10**9, progress=False, **kwargs)


def preset(name: str, data_path: str | None = None) -> Preset:
    """The named preset: "synthetic", "ml-100k", "gowalla", "yelp2018" or "scifact"."""
    if name == "synthetic":  # the original tutorial
        return Preset(
            data=DataConfig(kind="synthetic"),
            model=ModelConfig(dim=64, score="cosine", temperature=1 / 30, logq_correction=False),
            train=quiet_training(epochs=3, batch_size=256, optimizer="adagrad", lr=0.1, log_every=100),
            budget=(8, 8, 256),
            ks=(100,),
            headline="precision@100",
        )
    if name == "ml-100k":
        return Preset(
            data=DataConfig(
                kind="movielens", path=data_dir("ml-100k", data_path), split="random", test_fraction=0.2
            ),
            model=ModelConfig(dim=64, score="cosine", temperature=0.1, logq_correction=True),
            train=quiet_training(epochs=20, batch_size=1024, optimizer="adam", lr=5e-3, log_every=20),
            budget=(8, 8, 16),  # 4-bit codes, the paper's default K
        )
    if name == "gowalla":
        return Preset(
            data=DataConfig(kind="lightgcn", path=data_dir("gowalla", data_path)),
            model=ModelConfig(dim=64, score="cosine", temperature=0.1, logq_correction=True),
            train=quiet_training(epochs=10, batch_size=2048, optimizer="adam", lr=5e-3, log_every=20),
            budget=(16, 8, 256),
        )
    if name == "yelp2018":  # an interaction set held out of every tuning: Gowalla's settings as they are
        return replace(
            preset("gowalla"), data=DataConfig(kind="lightgcn", path=data_dir("yelp2018", data_path))
        )
    if name == "scifact":  # text: the query tower fine-tunes MiniLM, documents are embedded once
        text = {"encoder": DEFAULT_ENCODER, "mode": "query", "encoder_lr": 2e-5}
        return Preset(
            data=DataConfig(kind="beir", path=data_dir("scifact", data_path)),
            model=ModelConfig(dim=384, temperature=0.05, random_negatives=64, text=text),
            train=quiet_training(epochs=6, batch_size=64, optimizer="adam", lr=1e-3, log="none"),
            budget=(0, 16, 256),
            ks=(10,),
            headline="ndcg@10",
            warmup_fraction=0.1,
            buffer_size=4096,
            kmeans_points_per_list=16,  # 5,183 documents: FAISS's guideline gives ~20 per list
        )
    raise SystemExit(f"unknown dataset {name!r}: pick synthetic, ml-100k, gowalla, yelp2018 or scifact")


def tiny(p: Preset) -> Preset:
    """A seconds-long version of a preset, for the smoke test."""
    data = replace(p.data, num_pairs=3000) if p.data.kind == "synthetic" else p.data
    return replace(
        p,
        data=data,
        train=replace(p.train, epochs=1, batch_size=256),
        budget=(2, 4, 16),
        layer={"kmeans_iters": 2, "opq_rounds": 1},
    )
