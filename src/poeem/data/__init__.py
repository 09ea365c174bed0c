"""Data: every loader returns an :class:`InteractionData`; :func:`load_data` picks one by config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from poeem.data.beir import beir_task, load_beir
from poeem.data.interactions import CSR, InteractionData
from poeem.data.lightgcn import load_lightgcn
from poeem.data.movielens import load_movielens
from poeem.data.splits import Split
from poeem.data.synthetic import synthetic_task
from poeem.data.table import load_table
from poeem.errors import PoeemError

DataKind = Literal["synthetic", "movielens", "lightgcn", "table", "beir"]


@dataclass
class DataConfig:
    """Which data to train on, and how to split it."""

    kind: DataKind = "synthetic"
    path: str | None = None  # file or folder, for every kind but synthetic
    num_pairs: int = 1_000_000  # synthetic only
    min_rating: float = 0.0  # movielens: ratings below are dropped
    split: Split = "leave-last-out"  # movielens and table (table needs time_column for it)
    test_fraction: float = 0.2  # with split="random"
    query_column: str = "user"  # table only
    item_column: str = "item"
    time_column: str | None = None
    query_feature_columns: list[str] = field(default_factory=list)
    item_feature_columns: list[str] = field(default_factory=list)
    seed: int = 0


def load_data(cfg: DataConfig) -> InteractionData:
    """Load the data a :class:`DataConfig` names."""
    if cfg.kind == "synthetic":
        return synthetic_task(cfg.num_pairs, cfg.seed)
    if cfg.kind not in ("movielens", "lightgcn", "table", "beir"):
        raise PoeemError(
            "data kind",
            "'synthetic', 'movielens', 'lightgcn', 'table' or 'beir'",
            repr(cfg.kind),
            "pick one of those",
        )
    if not cfg.path:
        raise PoeemError(f"{cfg.kind} data", "a path", "none", "pass --data-path PATH")
    if cfg.kind == "movielens":
        return load_movielens(cfg.path, cfg.min_rating, cfg.split, cfg.test_fraction, cfg.seed)
    if cfg.kind == "lightgcn":
        return load_lightgcn(cfg.path)
    if cfg.kind == "beir":
        return beir_task(cfg.path)
    return load_table(
        cfg.path,
        cfg.query_column,
        cfg.item_column,
        cfg.time_column,
        tuple(cfg.query_feature_columns),
        tuple(cfg.item_feature_columns),
        cfg.split,
        cfg.test_fraction,
        cfg.seed,
    )


__all__ = [
    "CSR",
    "DataConfig",
    "InteractionData",
    "beir_task",
    "load_beir",
    "load_data",
    "load_lightgcn",
    "load_movielens",
    "load_table",
    "synthetic_task",
]
