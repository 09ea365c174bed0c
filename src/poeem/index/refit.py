"""Refit a trained layer's residual coder on the finished model, inside the lists it trained.

Joint training gives the lists and the item embeddings; the codes of the residuals are fitted
again on the final embeddings, with product quantization ("pq") or a residual quantizer ("rq",
same bytes). Measured on MovieLens 100K, Gowalla, SciFact and the synthetic task: the joint
model's lists with a residual quantizer refitted and then distilled (the lists kept:
:meth:`poeem.training.distill.DistillConfig.keeping_lists`) beat both the jointly trained codes
and every index built after separate training (docs/design.md, "Refit after training").
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from poeem.errors import PoeemError
from poeem.index.config import PoeemConfig
from poeem.index.layer import PoeemLayer
from poeem.index.quantize import coarse_assign, fit_residual_coder
from poeem.options import MAX_SEED

REFIT_SAMPLE = 1 << 18  # items the coder is fitted on, at most (every item is encoded afterwards)
Refit = Literal["pq", "rq"]


def check_refit(quantizer: str) -> None:
    """Refuse a refit quantizer other than "pq" or "rq"."""
    if quantizer not in ("pq", "rq"):
        raise PoeemError("refit", "'pq' or 'rq'", repr(quantizer), "pick one, e.g. rq")


def refit_settings(settings: dict[str, Any], quantizer: str) -> dict[str, Any]:
    """The layer settings (PoeemConfig fields) of a refit of a layer with ``settings``: the
    quantizer replaced, and no rotation for a residual quantizer (its lists are un-rotated)."""
    check_refit(quantizer)
    return {**settings, "quantizer": quantizer, **({"rotation": "none"} if quantizer == "rq" else {})}


@torch.no_grad()
def refit_layer(
    layer: PoeemLayer, items: torch.Tensor, quantizer: Refit = "rq", progress: bool = False
) -> PoeemLayer:
    """A new layer with ``layer``'s lists and rotation and a residual coder fitted on ``items``.

    Args:
        layer: a trained (initialised) layer; it is not changed.
        items: (n, dim) the finished model's item embeddings, n >= the codebook size; the coder
            is fitted on a random :data:`REFIT_SAMPLE` of them at most.
        quantizer: "rq" (residual stages; the rotation is folded into the lists, as RQ takes
            none) or "pq" (subvectors, in the layer's rotation).
        progress: show the k-means progress of a PQ fit.

    Returns:
        The refitted layer, quantizing, with the same D, K and lists (items keep their list).
    """
    if not layer.is_initialized:
        raise PoeemError("refit", "a trained layer (past its warm start)", "an unfitted layer", "train first")
    layer._check_input(items)  # the layer's own checks of an item batch: shape, dtype, finite
    c = layer.config
    if items.shape[0] < c.codebook_size:
        raise PoeemError(
            "refit items", f"at least K = {c.codebook_size} items", str(items.shape[0]), "pass more items"
        )
    settings = refit_settings({k: v for k, v in c.to_dict().items() if k != "dim"}, quantizer)
    new = PoeemLayer(PoeemConfig(dim=c.dim, **settings)).to(items.device)
    x = items.detach().float()
    if x.shape[0] > REFIT_SAMPLE:
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c.seed))[:REFIT_SAMPLE]
        x = x[pick.to(x.device)]
    rotation = layer.rotation_matrix.detach().float()
    coarse = None if layer.coarse is None else layer.coarse.detach().float()
    if quantizer == "rq":
        # RQ takes no rotation: its lists in the items' own coordinates, <q, c R^T> = <qR, c>
        coarse = None if coarse is None else coarse @ rotation.T
        rotation = torch.eye(c.dim, device=x.device)
    residual = x @ rotation
    if coarse is not None:
        residual = residual - coarse[coarse_assign(residual, coarse, c.coarse_metric, bulk=True).to(x.device)]
    codebooks = fit_residual_coder(
        residual,
        quantizer,
        c.num_subspaces,
        c.codebook_size,
        c.kmeans_iters,
        (c.seed + 1) % (MAX_SEED + 1),
        progress,
    )
    new.initialize_from(rotation, coarse, codebooks)
    return new
