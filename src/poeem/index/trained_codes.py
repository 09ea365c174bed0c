"""The codes the layer computed for each item in training: the index as trained.

The paper's point is that joint training leaves the index built: every training step already
assigns its items to a list and codewords. :class:`TrainedCodes` keeps each item's latest
assignment, so an export can take those codes instead of encoding the catalogue again (the
cost that grows with the catalogue: a search of every item over every list).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from poeem.distributed import gather_rows, is_active
from poeem.errors import PoeemError
from poeem.index.quantize import smallest_uint_dtype

NOT_SEEN = -1
DISTILLED = -2  # the step of codes an index distillation kept: the index itself, served as they are


def _code_dtype(n: int) -> torch.dtype:
    """Storage of codes in 0..n-1: :func:`smallest_uint_dtype`, but int32 for its uint16 (torch
    cannot index-assign uint16)."""
    dtype = smallest_uint_dtype(n)
    return torch.int32 if dtype == torch.uint16 else dtype


class TrainedCodes(nn.Module):
    """Per item: the training step of its latest quantized forward, and the codes computed there.

    Buffers (saved with the model): ``step`` (num_items,) int32, -1 for an item not coded since
    the index was fitted; ``codes`` (num_items, D); ``coarse_codes`` (num_items,) or None without
    IVF. Under torch.distributed every rank records the items of all ranks, so the buffers stay
    identical across ranks.
    """

    def __init__(self, num_items: int, num_subspaces: int, codebook_size: int, num_coarse: int) -> None:
        super().__init__()
        self.register_buffer("step", torch.full((num_items,), NOT_SEEN, dtype=torch.int32))
        self.register_buffer("codes", torch.zeros(num_items, num_subspaces, dtype=_code_dtype(codebook_size)))
        coarse = torch.zeros(num_items, dtype=_code_dtype(num_coarse)) if num_coarse else None
        self.register_buffer("coarse_codes", coarse)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        """A model saved before trained codes existed loads with none remembered."""
        if prefix + "step" in state_dict:
            super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def num_items(self) -> int:
        return self.step.shape[0]

    @torch.no_grad()
    def record(
        self, ids: torch.Tensor, coarse_codes: torch.Tensor | None, codes: torch.Tensor, step: int
    ) -> None:
        """Remember the codes of a training batch (all ranks' batches under torch.distributed).

        Args:
            ids: (B,) integer item ids in [0, num_items).
            coarse_codes: (B,) lists, or None without IVF.
            codes: (B, D) sub-codes.
            step: the layer's training step.
        """
        if ids.dim() != 1 or ids.shape[0] != codes.shape[0] or ids.is_floating_point():
            raise PoeemError(
                "PoeemLayer item ids",
                f"a 1-D integer tensor of {codes.shape[0]} ids, one per row of x",
                f"{ids.dtype} of shape {tuple(ids.shape)}",
                "pass the item ids of the batch, or no ids",
            )
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.num_items:
                raise PoeemError(
                    "PoeemLayer item ids",
                    f"ids in [0, {self.num_items}) (the layer's num_items)",
                    f"ids from {low} to {high}",
                    "map raw ids to rows first, or build the layer with a larger num_items",
                )
        if is_active():  # every rank records all ranks' items, in one gather
            parts = [ids.long(), codes.long()] + ([coarse_codes.long()] if coarse_codes is not None else [])
            rows = gather_rows(torch.cat([p.reshape(ids.shape[0], -1) for p in parts], dim=1))
            ids, codes = rows[:, 0], rows[:, 1 : 1 + codes.shape[1]]
            coarse_codes = rows[:, -1] if coarse_codes is not None else None
        device = self.step.device
        ids = ids.to(device)
        self.step[ids] = step
        self.codes[ids] = codes.to(device, self.codes.dtype)
        if self.coarse_codes is not None and coarse_codes is not None:
            self.coarse_codes[ids] = coarse_codes.to(device, self.coarse_codes.dtype)

    @torch.no_grad()
    def forget(
        self, lists: torch.Tensor | None = None, codewords: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> None:
        """Forget items coded with lists or codewords that moved (all items when both are None).

        Args:
            lists: (L,) coarse lists that were re-seeded.
            codewords: (subspace (W,), codeword (W,)) pairs that were re-seeded.
        """
        if lists is None and codewords is None:
            self.step.fill_(NOT_SEEN)
            return
        stale = torch.zeros_like(self.step, dtype=torch.bool)
        if lists is not None and self.coarse_codes is not None and lists.numel():
            stale |= torch.isin(self.coarse_codes.long(), lists.to(self.step.device))
        if codewords is not None:
            subspace, word = (t.to(self.step.device) for t in codewords)
            for d in subspace.unique().tolist():
                stale |= torch.isin(self.codes[:, d].long(), word[subspace == d])
        self.step[stale] = NOT_SEEN

    @torch.no_grad()
    def keep_distilled(self, coarse_codes: torch.Tensor | None, codes: torch.Tensor) -> None:
        """Remember the codes an index distillation kept for every item, marked :data:`DISTILLED`:
        an export takes them as they are (re-encoding would lose what the distillation chose).

        Args:
            coarse_codes: (num_items,) lists in id order, or None without IVF.
            codes: (num_items, D) sub-codes in id order.
        """
        if codes.shape != self.codes.shape:
            raise PoeemError(
                "distilled codes",
                f"shape {tuple(self.codes.shape)}",
                f"{tuple(codes.shape)}",
                "pass every item's",
            )
        device = self.step.device
        self.step.fill_(DISTILLED)
        self.codes.copy_(codes.to(device, self.codes.dtype))
        if self.coarse_codes is not None and coarse_codes is not None:
            self.coarse_codes.copy_(coarse_codes.to(device, self.coarse_codes.dtype))

    @torch.no_grad()
    def forget_distilled(self) -> None:
        """Forget the codes a distillation kept (the codewords are about to train again)."""
        self.step[self.step == DISTILLED] = NOT_SEEN

    def distilled(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """(n,) bool: which items (of ``rows``, as in :meth:`seen`) hold codes a distillation kept."""
        return self.step[slice(None) if rows is None else rows] == DISTILLED

    def seen(self, rows: torch.Tensor | slice | None = None) -> torch.Tensor:
        """(n,) bool: which items (of ``rows``: ids on this module's device or a slice; all by
        default) have codes from training."""
        return self.step[slice(None) if rows is None else rows] != NOT_SEEN
