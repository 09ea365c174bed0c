"""The learned index as plain tensors: what training computed, with no further fitting."""

from __future__ import annotations

import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.index import PoeemLayer
from poeem.search.adc import IndexTensors

ItemsOrCodes = torch.Tensor | tuple[torch.Tensor | None, torch.Tensor]


def check_ids(ids: torch.Tensor | np.ndarray | None, n: int) -> torch.Tensor:
    """(n,) int64 ids, 0..n-1 by default; rejects a wrong length and duplicates."""
    if ids is None:
        return torch.arange(n)
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).flatten()
    if ids.numel() != n:
        raise PoeemError("ids", f"one id per item ({n})", f"{ids.numel()} ids", "pass one 64-bit id per item")
    if ids.unique().numel() != n:
        raise PoeemError("ids", "unique ids", f"{n - ids.unique().numel()} duplicates", "deduplicate the ids")
    return ids


def learned_index(
    layer: PoeemLayer, items: ItemsOrCodes, ids: torch.Tensor | np.ndarray | None = None
) -> IndexTensors:
    """The learned IVF-PQ index of a trained layer, without fitting anything.

    Args:
        layer: an initialized :class:`PoeemLayer`.
        items: (n, dim) item embeddings (encoded with the layer's frozen codebooks), or the
            ``(coarse_codes, codes)`` pair that :meth:`PoeemLayer.encode` returned.
        ids: (n,) int64 item ids; 0..n-1 by default.

    Returns:
        :class:`IndexTensors` on CPU.
    """
    if not layer.is_initialized:
        raise PoeemError(
            "export",
            "a trained, initialized PoeemLayer",
            f"phase '{layer.phase_name}'",
            "train past the warm start or call layer.initialize(x)",
        )
    if isinstance(items, torch.Tensor):
        coarse_codes, codes = layer.encode(items)
    else:
        coarse_codes, codes = items
        if codes.dim() != 2 or codes.shape[1] != layer.config.num_subspaces:
            raise PoeemError(
                "codes",
                f"shape (n, {layer.config.num_subspaces})",
                f"shape {tuple(codes.shape)}",
                "pass codes from layer.encode()",
            )
        if codes.numel() and int(codes.long().max()) >= layer.config.codebook_size:
            raise PoeemError(
                "codes",
                f"values < K={layer.config.codebook_size}",
                "larger values",
                "pass codes from this layer's encode()",
            )
    n = codes.shape[0]
    if coarse_codes is None:
        if layer.coarse is not None:
            raise PoeemError(
                "coarse_codes",
                f"(n,) codes for {layer.config.num_coarse} lists",
                "None",
                "pass both outputs of layer.encode()",
            )
        coarse_codes = torch.zeros(n, dtype=torch.long)
    coarse = layer.coarse.detach().cpu().float() if layer.coarse is not None else None
    return IndexTensors(
        rotation=layer.rotation_matrix.detach().cpu().float(),
        coarse=coarse,
        codebooks=layer.codebooks.detach().cpu().float(),
        coarse_codes=coarse_codes.cpu().long(),
        codes=codes.cpu().long(),
        ids=check_ids(ids, n),
    )
