"""A learnable rotation that is orthogonal by construction: a product of Givens rotations.

There are d(d-1)/2 angles, one per coordinate pair. The pairs are grouped into d-1 rounds (d
rounds for odd d) of disjoint pairs, a round-robin schedule, so one round is one parallel tensor
op. Every round is an exact rotation, so the product stays orthogonal to float32 precision
whatever the optimizer does to the angles.
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
        """The rotation as a (dim, dim) float32 matrix, differentiable in the angles.

        Each round G_r is built as a dense matrix in one scatter, then the R rounds are
        multiplied as a balanced tree (log2 R batched matmuls), so rounding errors stay at
        float32 precision and no Python loop runs over the rounds.
        """
        num_rounds, num_pairs = self.pair_i.shape
        cos, sin = self.angles.cos(), self.angles.sin()  # (R, P)
        rounds = torch.arange(num_rounds, device=cos.device).unsqueeze(1).expand(num_rounds, num_pairs)
        diag = torch.ones(num_rounds, self.dim, device=cos.device, dtype=cos.dtype)
        diag = diag.index_put((rounds, self.pair_i), cos).index_put((rounds, self.pair_j), cos)
        # (M G_r)[:, i] = M[:, i] cos - M[:, j] sin and (M G_r)[:, j] = M[:, i] sin + M[:, j] cos
        g = torch.diag_embed(diag).index_put((rounds, self.pair_j, self.pair_i), -sin)
        g = g.index_put((rounds, self.pair_i, self.pair_j), sin)  # (R, dim, dim)
        while g.shape[0] > 1:
            if g.shape[0] % 2:
                g = torch.cat([g, torch.eye(self.dim, device=g.device, dtype=g.dtype).unsqueeze(0)])
            g = g[0::2] @ g[1::2]  # keeps the order G_0 G_1 ... G_{R-1}
        return g[0]
