"""The warm start under torch.distributed: two CPU processes (gloo) must end with one index."""

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from poeem import PoeemLayer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(100 + rank)  # every rank sees different items
    layer = PoeemLayer(
        dim=8, num_subspaces=2, codebook_size=8, num_coarse=2, warmup_steps=1, buffer_size=48, kmeans_iters=3
    )
    batches = [torch.randn(8 + 4 * rank, 8) for _ in range(4)]  # uneven batch sizes per rank
    for b in batches:
        layer(b)
    torch.save(
        {
            "codebooks": layer.codebooks.detach(),
            "coarse": layer.coarse.detach(),
            "phase": layer.phase_name,
            "batches": batches,
        },
        f"{out}/rank{rank}.pt",
    )
    dist.destroy_process_group()


def test_ranks_share_one_index(tmp_path: Path) -> None:
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["phase"] == r1["phase"] == "quantize"
    assert torch.equal(r0["codebooks"], r1["codebooks"]) and torch.equal(r0["coarse"], r1["coarse"])
    # the buffer held both ranks' items: fitting one layer on them gives the same index
    rows = torch.cat([torch.cat([a, b]) for a, b in zip(r0["batches"][1:], r1["batches"][1:], strict=True)])
    single = PoeemLayer(
        dim=8, num_subspaces=2, codebook_size=8, num_coarse=2, warmup_steps=0, buffer_size=48, kmeans_iters=3
    )
    single.initialize(rows[:48])
    torch.testing.assert_close(single.codebooks.detach(), r0["codebooks"])
