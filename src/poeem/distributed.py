"""torch.distributed helpers that degrade to no-ops in a single process.

The Poeem warm start must give every rank the same codebooks: each rank gathers all ranks'
item embeddings into its buffer, so the buffers are identical, and after k-means rank 0's
result is broadcast so that floating-point differences cannot split the replicas.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Number of processes in the default group, 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; batches may differ in size.

    Args:
        x: (n_rank, d) this rank's rows.

    Returns:
        (sum of n_rank, d) rows of all ranks; ``x`` itself in a single process.
    """
    if world_size() == 1:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor, in place, with rank 0's value (no-op in a single process)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)
