"""A tower: an id embedding table, plus optional numeric side features through an MLP."""

from __future__ import annotations

import torch
from torch import nn


class Tower(nn.Module):
    """Maps an id (and optional numeric features) to a ``dim``-dimensional embedding.

    With no numeric features and no hidden layers this is matrix factorisation's embedding
    table. Numeric features go through an MLP whose output is added to the id embedding.
    """

    def __init__(
        self,
        num_ids: int,
        dim: int,
        num_numeric: int = 0,
        hidden: tuple[int, ...] = (),
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_ids, dim)
        nn.init.normal_(self.embedding.weight, std=init_std)
        self.numeric: nn.Module | None = None
        if num_numeric:
            layers: list[nn.Module] = []
            width = num_numeric
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, dim))
            self.numeric = nn.Sequential(*layers)

    def forward(self, ids: torch.Tensor, numeric: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ids (B,) int64; numeric (B, F) float or None. Returns (B, dim)."""
        out = self.embedding(ids)
        if self.numeric is not None and numeric is not None:
            out = out + self.numeric(numeric)
        return out
