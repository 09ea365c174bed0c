import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) Gaussian data with strongly unequal, correlated coordinates."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, dim)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    return (torch.randn(n, dim, generator=g) * scales) @ mix
