"""Search metrics shared by the layer, export and every search backend."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from poeem.errors import PoeemError

Metric = Literal["ip", "cosine", "l2"]
ListRule = Literal["l2", "ip"]
METRICS = ("ip", "cosine", "l2")
# items at most this long: any two are within float32 of each other, ||x - y||^2 <= 4 max ||x||^2
MAX_ITEM_NORM = float(np.sqrt(np.finfo(np.float32).max)) / 2


def check_metric(metric: str) -> None:
    """Raise a clear error for an unknown metric."""
    if metric not in METRICS:
        raise PoeemError("metric", "'ip', 'cosine' or 'l2'", repr(metric), "pick one of those")


def list_rule(metric: str) -> ListRule:
    """How an index of this metric probes IVF lists: nearest centroid ("l2") for L2, largest
    inner product ("ip") for ip and cosine (queries are normalised before probing)."""
    check_metric(metric)
    return "l2" if metric == "l2" else "ip"


def check_search_args(k: int, nprobe: int) -> None:
    """Raise a clear error unless ``k`` and ``nprobe`` are positive integers."""
    ok = all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (k, nprobe))
    if not ok or k < 1 or nprobe < 1:
        raise PoeemError(
            "search", "integers k >= 1 and nprobe >= 1", f"k={k!r}, nprobe={nprobe!r}", "pass positive values"
        )


def prepare_queries(
    xq: torch.Tensor | np.ndarray, metric: str, dim: int | None, what: str = "queries"
) -> torch.Tensor:
    """Validate (nq, dim) finite vectors and L2-normalise them for cosine; returns float32.

    Args:
        xq: (nq, dim) numbers.
        metric: "ip", "cosine" or "l2".
        dim: the index's dimension, or None for any.
        what: how error messages name the vectors.
    """
    shape = f"(n, {dim})" if dim is not None else "(n, dim)"
    if not isinstance(xq, torch.Tensor):
        try:
            xq = torch.as_tensor(np.asarray(xq, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise PoeemError(
                what, f"an {shape} array of numbers", f"{err}", "pass float vectors of one length"
            ) from None
    if xq.dim() != 2 or (dim is not None and xq.shape[1] != dim):
        raise PoeemError(
            what,
            f"shape {shape}",
            f"shape {tuple(xq.shape)}",
            f"pass vectors of dimension {dim} (the index's dim)" if dim is not None else "pass a 2-D array",
        )
    if xq.dtype == torch.bool or xq.is_complex():
        raise PoeemError(what, "real numbers", str(xq.dtype), "pass float vectors")
    xq = xq.float()
    finite = torch.isfinite(xq).all(-1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten()
        raise PoeemError(
            what,
            "finite values",
            f"NaN or inf in {bad.numel()} rows, e.g. row {int(bad[0])}",
            "check the embeddings (a NaN query would silently return nothing)",
        )
    if metric != "cosine":
        return xq
    scale = xq.abs().amax(-1, keepdim=True)  # first to max |x| = 1: huge values do not overflow
    zero = scale.squeeze(-1) == 0
    if bool(zero.any()):
        bad = torch.nonzero(zero).flatten()
        raise PoeemError(
            what,
            "non-zero vectors (cosine has no direction for zero)",
            f"{bad.numel()} all-zero rows, e.g. row {int(bad[0])}",
            "drop those rows",
        )
    return F.normalize(xq / scale, dim=-1)


def check_item_norms(x: torch.Tensor, what: str = "items") -> None:
    """Refuse (n, dim) finite vectors too long to fit an index to: the distances between them
    (k-means, coding) would overflow float32, at norms above :data:`MAX_ITEM_NORM` (about 9e18)."""
    norms = torch.linalg.vector_norm(x, dim=-1)  # inf where the squares overflow: refused too
    too_long = norms > MAX_ITEM_NORM
    if bool(too_long.any()):
        rows = torch.nonzero(too_long).flatten()
        first = float(x[rows[0]].double().norm())  # in float64: its float32 norm may be inf
        raise PoeemError(
            what,
            f"vectors of norm at most {MAX_ITEM_NORM:.2g} (distances between them must fit in float32)",
            f"{rows.numel()} longer rows, e.g. row {int(rows[0])} (norm {first:.3g})",
            "divide every vector by one constant: inner-product and L2 rankings stay the same",
        )


def worst_score(metric: str) -> float:
    """The score of a missing result: -inf for similarities, +inf for L2 distances."""
    return float("inf") if metric == "l2" else float("-inf")
