"""Data: every loader returns an :class:`InteractionData`; :func:`load_data` picks one by config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from poeem.data.beir import beir_task, load_beir
from poeem.data.interactions import CSR, InteractionData
from poeem.data.lightgcn import load_lightgcn
from poeem.data.movielens import load_movielens
from poeem.data.splits import Split
from poeem.data.synthetic import synthetic_task
from poeem.data.table import load_table
from poeem.errors import PoeemError
from poeem.options import Bounds, PositiveInt, Seed, check_settings, setting

DataKind = Literal["synthetic", "movielens", "lightgcn", "table", "beir"]


@dataclass
class DataConfig:
    """Which data to train on, and how to split it."""

    kind: DataKind = setting(
        "synthetic", help="Which data: synthetic (built in) or a format to read.", flag="--data"
    )
    path: str | None = setting(
        None, help="File or folder of the data (every kind but synthetic).", flag="--data-path"
    )
    num_pairs: PositiveInt = setting(1_000_000, help="synthetic: training pairs.")
    min_rating: float = setting(0.0, help="movielens: drop ratings below.")
    split: Split = setting(
        "leave-last-out", help="movielens and table (table needs --time-column for leave-last-out)."
    )
    test_fraction: Annotated[float, Bounds(gt=0, lt=1)] = setting(
        0.2, help="Held-out share with --split random."
    )
    query_column: str = setting("user", help="table: query id column.")
    item_column: str = setting("item", help="table: item id column.")
    time_column: str | None = setting(None, help="table: time column (for leave-last-out).")
    query_feature_columns: list[str] = setting(
        default_factory=list, help="table: numeric query feature column; repeat.", flag="--query-feature"
    )
    item_feature_columns: list[str] = setting(
        default_factory=list, help="table: numeric item feature column; repeat.", flag="--item-feature"
    )
    seed: Seed = setting(0, help="Seed of the data (synthetic pairs, random splits).", flag="--data-seed")

    def __post_init__(self) -> None:
        check_settings(self, "data")


def load_data(cfg: DataConfig) -> InteractionData:
    """Load the data a :class:`DataConfig` names."""
    if cfg.kind == "synthetic":
        return synthetic_task(cfg.num_pairs, cfg.seed)
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
