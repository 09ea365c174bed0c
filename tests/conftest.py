"""Shared test helpers: data, trained layers and index folders, tiny runs, rank and CLI launchers,
a served index, and a table with string ids and features. Test modules import them from here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from poeem import PoeemLayer, Searcher

if TYPE_CHECKING:
    from poeem.pipeline import RunConfig


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# ------------------------------------------------------------------------ data
DIM, D = 16, 4


def correlated(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(n, dim) Gaussian data with strongly unequal, correlated coordinates."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -1, dim)
    mix = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    return (torch.randn(n, dim, generator=g) * scales) @ mix


def clustered(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(40, DIM, generator=g)
    return centres[torch.randint(40, (n,), generator=g)] + 0.4 * torch.randn(n, DIM, generator=g)


# ---------------------------------------------------------- layers and indexes
def trained_layer(
    rotation: str, num_coarse: int, k: int = 16, coarse_metric: str = "ip", quantizer: str = "pq"
) -> tuple[PoeemLayer, torch.Tensor]:
    x = correlated(1500, DIM, seed=1)
    layer = PoeemLayer(
        coarse_metric=coarse_metric,
        dim=DIM,
        num_subspaces=D,
        codebook_size=k,
        num_coarse=num_coarse,
        rotation=rotation,
        quantizer=quantizer,
        warmup_steps=0,
        buffer_size=1000,
        kmeans_iters=4,
        opq_rounds=1,
    )
    layer.initialize(x[:1000])
    if rotation == "givens":  # move the angles so the rotation is not just the OPQ one
        with torch.no_grad():
            layer.givens.angles.uniform_(-0.3, 0.3)
    return layer, x


def assert_same_topk(d1: np.ndarray, i1: np.ndarray, d2: np.ndarray, i2: np.ndarray) -> None:
    """Scores equal; ids equal except among tied scores (compared as sets per score)."""
    np.testing.assert_allclose(d1, d2, atol=1e-4, rtol=1e-5)
    for a_d, a_i, b_i in zip(d1, i1, i2, strict=True):
        kth = a_d[-1]
        strictly_in = np.abs(a_d - kth) > 1e-4  # not tied with the last kept score
        assert set(a_i[strictly_in]) == set(b_i[strictly_in])


def make_dir(tmp_path: Path, backend: str = "faiss") -> tuple[Searcher, PoeemLayer, torch.Tensor]:
    layer, x = trained_layer("givens", 8)
    x = torch.nn.functional.normalize(x, dim=1)  # a cosine model's items are unit vectors
    # plain IVF-PQ, whose scores equal poeem's own (4-bit codes default to approximate fast scan)
    Searcher.create(
        tmp_path / "ix", layer, x[:1000], ids=np.arange(1000) + 10, metric="cosine", fast_scan=False
    )
    return Searcher.load(tmp_path / "ix", backend=backend), layer, x


def distill_from_faiss_file(
    tmp_path: Path, items: np.ndarray, queries: np.ndarray, start: Path, epochs: int
) -> list[str]:
    """``poeem distill --items --queries --from-faiss start --out tmp_path/ix`` (one round of
    ``epochs``) on (n, dim) ``items`` and (nq, dim) ``queries`` saved as .npy; its arguments."""
    from typer.testing import CliRunner

    from poeem.cli import app

    np.save(tmp_path / "items.npy", items)
    np.save(tmp_path / "queries.npy", queries)
    args = ["distill", "--items", str(tmp_path / "items.npy"), "--queries", str(tmp_path / "queries.npy")]
    args += ["--from-faiss", str(start), "--out", str(tmp_path / "ix"), "--rounds", "1"]
    result = CliRunner().invoke(app, [*args, "--epochs", str(epochs), "--teacher-k", "20", "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    return args


# ------------------------------------------------------------------- tiny runs
def tiny_config() -> RunConfig:
    from poeem.data import DataConfig
    from poeem.model import ModelConfig
    from poeem.pipeline import EvalConfig, RunConfig
    from poeem.training import TrainConfig

    layer = {"num_coarse": 2, "num_subspaces": 4, "codebook_size": 16, "warmup_steps": 4, "buffer_size": 256}
    return RunConfig(
        data=DataConfig(kind="synthetic", num_pairs=2000),
        model=ModelConfig(dim=16, poeem=layer),
        train=TrainConfig(epochs=1, batch_size=256, progress=False, checkpoint_every=0, log="none"),
        eval=EvalConfig(ks=(10,), faiss_baseline=False),
    )


def tiny_run(tmp_path: Path) -> Path:
    """A finished run folder of a tiny synthetic Poeem run."""
    from poeem.pipeline import train_run

    train_run(tiny_config(), tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------ a table with ids and features
TABLE_LAYER = {
    "num_coarse": 4,
    "num_subspaces": 4,
    "codebook_size": 16,
    "warmup_steps": 4,
    "buffer_size": 256,
    "kmeans_iters": 3,
}


def write_table(path: Path, seed: int = 0) -> Path:
    """Interactions with string ids, a time column, and numeric user and item features."""
    rng = np.random.default_rng(seed)
    users = [f"user-{u:03d}" for u in range(60)]
    items = [f"sku-{i:04d}" for i in rng.choice(9000, 200, replace=False)]
    item_price = rng.normal(size=200)
    user_age = rng.normal(size=60)
    rows = ["user,item,time,age,price,weight"]
    for t in range(3000):
        u = int(rng.integers(60))
        i = int((u * 3 + rng.integers(12)) % 200)
        rows.append(f"{users[u]},{items[i]},{t},{user_age[u]:.3f},{item_price[i]:.3f},{i % 7}")
    path.write_text("\n".join(rows) + "\n")
    return path


def table_config(path: Path) -> RunConfig:
    from poeem.data import DataConfig
    from poeem.model import ModelConfig
    from poeem.pipeline import EvalConfig, RunConfig
    from poeem.training import TrainConfig

    data = DataConfig(
        kind="table",
        path=str(path),
        time_column="time",
        query_feature_columns=["age"],
        item_feature_columns=["price", "weight"],
    )
    model = ModelConfig(dim=16, query_hidden=(8,), item_hidden=(8,), poeem=TABLE_LAYER)
    train = TrainConfig(epochs=2, batch_size=128, progress=False, log="none", checkpoint_every=0)
    return RunConfig(data, model, train, EvalConfig(ks=(10,), faiss_baseline=False))


# ------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(*args)
        dist.barrier()  # no rank tears gloo down while another still uses it (a flaky SIGABRT)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], *args: Any, world: int = 2) -> None:
    """Run ``fn(*args)`` in ``world`` gloo processes (in this process when world is 1)."""
    if world == 1:
        fn(*args)
        return
    mp.spawn(_join, args=(world, free_port(), fn, args), nprocs=world, join=True)


def cli(*args: str, torchrun: bool = False, ok: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``poeem ARGS`` (under ``torchrun --nnodes 1 --nproc-per-node 2`` with ``torchrun``)."""
    launcher = ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    port = ["--master-port", str(free_port())]
    command = [sys.executable, *(launcher + port if torchrun else []), "-m", "poeem", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert (done.returncode == 0) == ok, done.stderr[-3000:]
    return done


# ----------------------------------------------------------------------- serve
TOKEN = "test-token-0123456789abcdef"


class Server:
    """A `poeem serve` subprocess and a tiny JSON client for it."""

    def __init__(self, index_dir: Path, token: str | None = TOKEN, *extra: str) -> None:
        self.port = free_port()
        args = [sys.executable, "-m", "poeem.cli", "serve", str(index_dir), "--port", str(self.port)]
        args += ["--log-level", "warning", "--poll-s", "0.2", *extra]
        env = {k: v for k, v in os.environ.items() if k != "POEEM_TOKEN"}
        if token is not None:
            env["POEEM_TOKEN"] = token
        self.process = subprocess.Popen(  # its own process group: workers included, it can be ended whole
            args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(self.process.stdout.read().decode())
            try:
                if self.call("GET", "/ready")[0] == 200:
                    return
            except OSError:
                time.sleep(0.1)
        os.killpg(self.process.pid, signal.SIGKILL)  # a server that never became ready ends with the test
        self.process.wait(timeout=30)
        raise RuntimeError("server did not become ready")

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        raw: bytes | None = None,
        content_type: str | None = "application/json",
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        if content_type is not None:
            request.add_header("content-type", content_type)
        if token is not None:
            request.add_header("authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
                status = response.status
        except urllib.error.HTTPError as err:
            text, status = err.read().decode(), err.code
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)
