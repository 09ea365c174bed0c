"""torch.distributed helpers that degrade to no-ops in a single process.

Under ``torchrun`` every process reads its place from the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`setup` joins the
group with gloo on CPU or NCCL on CUDA. The Poeem warm start must give every rank the same
codebooks: each rank gathers all ranks' item embeddings into its buffer, so the buffers are
identical, and after k-means rank 0's result is broadcast so that floating-point differences
cannot split the replicas. See ``docs/distributed.md``.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from poeem.errors import PoeemError

_ALONE = [False]  # inside alone(): this rank acts as a single process


def is_active() -> bool:
    """Whether a process group with more than one process is running (and this rank is not
    working :func:`alone`)."""
    return not _ALONE[0] and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group, 1 without torch.distributed or :func:`alone`."""
    return dist.get_world_size() if is_active() else 1


@contextmanager
def alone() -> Iterator[None]:
    """Inside, this rank acts as a single process: every helper here is a no-op collective. For
    work rank 0 does after the other ranks have finished (an index fitted after training)."""
    before, _ALONE[0] = _ALONE[0], True
    try:
        yield
    finally:
        _ALONE[0] = before


def rank() -> int:
    """This process's rank, 0 without torch.distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process logs, evaluates and writes files (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process job (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the torchrun process group when there is one, and pick this rank's device.

    Args:
        device: the device the run asked for; on CUDA each rank takes ``cuda:LOCAL_RANK``.

    Returns:
        The device this rank trains on (``device`` itself in a single process).
    """
    if not launched_by_torchrun():
        return device
    _end_with_parent()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise PoeemError(
                "distributed launch",
                "the torchrun environment (RANK, MASTER_ADDR, MASTER_PORT)",
                f"WORLD_SIZE={os.environ['WORLD_SIZE']} without {', '.join(missing)}",
                "start with 'torchrun --nproc-per-node N -m poeem train ...' or 'poeem train --nproc N'",
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def _end_with_parent() -> None:
    """Have the kernel send this rank SIGTERM when the process that started it (torchrun's
    agent, or the ``--nproc`` launcher) ends, even by SIGKILL: no rank trains on alone (Linux;
    a no-op elsewhere)."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def teardown() -> None:
    """Leave the process group, if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_active():
        dist.barrier()


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` rows: ranks 0..r-1 get one more when uneven."""
    per, extra = divmod(n, world_size())
    r = rank()
    start = r * per + min(r, extra)
    return slice(start, start + per + (1 if r < extra else 0))


def mean_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over ranks (a detached copy; ``x`` itself in a single process)."""
    if not is_active():
        return x
    out = x.detach().clone()
    dist.all_reduce(out)
    return out / world_size()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; batches may differ in size. No gradient.

    Args:
        x: (n_rank, ...) this rank's rows.

    Returns:
        (sum of n_rank, ...) rows of all ranks; ``x`` itself in a single process.
    """
    if not is_active():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *x.shape[1:], dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's rows
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows in rank order, differentiable: the loss on any rank reaches ``x``.

    With DistributedDataParallel averaging gradients over N ranks, N ranks of batch B/N that
    score against the gathered rows train exactly like one rank of batch B.

    Args:
        x: (B, ...) this rank's rows; every rank must pass the same B.

    Returns:
        (N * B, ...) rows of ranks 0..N-1; ``x`` itself in a single process.
    """
    return _GatherWithGrad.apply(x) if is_active() else x


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank; ``value`` itself in a single
    process."""
    if not is_active():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def broadcast_from_rank0(tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor, in place, with rank 0's value (no-op in a single process)."""
    if not is_active():
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def all_reduce_max(x: torch.Tensor) -> None:
    """Replace ``x``, in place, with its element-wise maximum over ranks (no-op in one process)."""
    if is_active():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
