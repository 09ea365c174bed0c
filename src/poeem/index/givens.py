"""A learnable rotation that is orthogonal by construction: a product of Givens rotations.

There are d(d-1)/2 angles, one per coordinate pair. The pairs are grouped into d-1 rounds (d
rounds for odd d) of disjoint pairs, a round-robin schedule, so one round is one parallel tensor
op. The matrix is accumulated in float64 and cast to float32, so it stays orthogonal to float32
precision whatever the optimizer does to the angles.
"""

from __future__ import annotations

import torch
from torch import nn


def round_robin_pairs(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint coordinate pairs covering every pair of ``d`` coordinates exactly once.

    Returns:
        i, j: (R, P) int64 tensors; round r rotates the planes (i[r, p], j[r, p]).
    """
    n = d + (d % 2)  # pad to even with a dummy player d, whose pairs are dropped
    players = list(range(n))
    rounds_i, rounds_j = [], []
    for _ in range(n - 1):
        pairs = [(players[p], players[n - 1 - p]) for p in range(n // 2)]
        pairs = [(min(a, b), max(a, b)) for a, b in pairs if a < d and b < d]
        rounds_i.append([a for a, _ in pairs])
        rounds_j.append([b for _, b in pairs])
        players = [players[0], players[-1], *players[1:-1]]
    return torch.tensor(rounds_i, dtype=torch.long), torch.tensor(rounds_j, dtype=torch.long)


class GivensRotation(nn.Module):
    """R = prod_r G_r, with G_r a block of disjoint plane rotations; R is (d, d) orthogonal.

    At zero angles R is the identity, so it starts from whatever base rotation precedes it.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        pair_i, pair_j = round_robin_pairs(dim)
        self.register_buffer("pair_i", pair_i, persistent=False)
        self.register_buffer("pair_j", pair_j, persistent=False)
        self.angles = nn.Parameter(torch.zeros(pair_i.shape))  # (R, P)
        self.dim = dim

    def matrix(self) -> torch.Tensor:
        """The rotation as a (dim, dim) float32 matrix, differentiable in the angles."""
        m = torch.eye(self.dim, dtype=torch.float64, device=self.angles.device)
        cos, sin = self.angles.double().cos(), self.angles.double().sin()  # (R, P)
        for r in range(self.pair_i.shape[0]):
            i, j = self.pair_i[r], self.pair_j[r]
            a, b = m[:, i], m[:, j]  # (dim, P) columns of the two planes
            m = m.index_copy(1, i, a * cos[r] - b * sin[r]).index_copy(1, j, a * sin[r] + b * cos[r])
        return m.float()
