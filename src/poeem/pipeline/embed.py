"""Item embeddings of a trained run, by the items' own ids: what ``poeem add --items`` takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.ids import known_rows
from poeem.metric import prepare_queries
from poeem.model.two_tower import TwoTowerModel
from poeem.pipeline.run_dir import load_run, read_artifacts


def embed_items(run_dir: str | Path, ids: Any, features: np.ndarray | None = None) -> np.ndarray:
    """Un-quantized embeddings of trained items, exactly as the item tower feeds its layer.

    Args:
        run_dir: a finished run of id towers.
        ids: (n,) the items' own ids (as in the training data).
        features: (n, Fi) numeric features of these items, for a tower with a feature MLP;
            by default the features saved with the run.

    Returns:
        (n, dim) float32 embeddings.
    """
    run_dir = Path(run_dir)
    _, model = load_run(run_dir)
    if not isinstance(model, TwoTowerModel):
        raise PoeemError(
            "poeem embed", "a run of id towers", "a text run", "embed documents with the text model in Python"
        )
    art = read_artifacts(run_dir)
    rows = known_rows(ids, art.item_keys, model.num_items, "item")
    tower_features = model.item_tower.num_numeric
    if features is not None and not tower_features:
        raise PoeemError(
            "item features", "none: this run's item tower takes no features", "features", "drop them"
        )
    feats = None
    if tower_features:
        if features is not None:
            feats = prepare_queries(features, "ip", tower_features, "item features")
            if feats.shape[0] != rows.numel():
                raise PoeemError(
                    "item features",
                    f"one row per id ({rows.numel()})",
                    f"{feats.shape[0]} rows",
                    "align them",
                )
        else:
            assert art.item_features is not None  # a tower with features was trained with them
            feats = art.item_features[rows]
    with torch.no_grad():
        return model.encode_items(rows, feats).float().numpy()
