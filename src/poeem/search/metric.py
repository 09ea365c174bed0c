"""Search metrics shared by every backend."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from poeem.errors import PoeemError

Metric = Literal["ip", "cosine", "l2"]
METRICS = ("ip", "cosine", "l2")


def check_metric(metric: str) -> None:
    """Raise a clear error for an unknown metric."""
    if metric not in METRICS:
        raise PoeemError("metric", "'ip', 'cosine' or 'l2'", repr(metric), "pick one of those")


def prepare_queries(xq: torch.Tensor | np.ndarray, metric: str, dim: int) -> torch.Tensor:
    """Validate (nq, dim) queries and L2-normalise them for cosine; returns float32."""
    if not isinstance(xq, torch.Tensor):
        xq = torch.as_tensor(xq)
    if xq.dim() != 2 or xq.shape[1] != dim:
        raise PoeemError(
            "queries",
            f"shape (nq, {dim})",
            f"shape {tuple(xq.shape)}",
            f"pass query embeddings of dimension {dim} (the index's dim)",
        )
    xq = xq.float()
    return F.normalize(xq, dim=-1) if metric == "cosine" else xq


def worst_score(metric: str) -> float:
    """The score of a missing result: -inf for similarities, +inf for L2 distances."""
    return float("inf") if metric == "l2" else float("-inf")
