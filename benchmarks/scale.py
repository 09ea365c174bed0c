"""How poeem's costs grow with the catalogue: training, warm start, export and search, on 1 and 2
processes.

For each catalogue size n (dim 64, 8 bytes per item: IVF{coarse_K},PQ8x8, coarse_K the power of two
nearest sqrt(n)) it measures, in a fresh process so that peak memory is per size:

- training steps/s of the two-tower model (id towers, cosine, in-batch softmax, Adam; the id
  tables on ``--table-optimizer``, row-wise Adagrad by default) without and with the Poeem
  layer (its defaults, and without its routing term, whose softmax over every list grows with
  coarse_K), and the process's peak resident memory;
- the warm-start k-means on 64 x coarse_K item embeddings;
- poeem's indexing (embed and encode in streaming chunks with the frozen layer, as ``poeem
  export`` does, then export to FAISS) and the peak memory so far, against FAISS's train on the
  same sample + add of all items (up to ``--faiss-max-size``);
- the exports that reuse what training computed (``poeem export --from-training codes``, and
  ``lists``: keep each item's list, encode its residual), once every item has codes in the
  layer's memory (filled with the codes above, standing in for a last epoch over the catalogue:
  training's forward computes them anyway; above ``--scratch-max-size`` the export from
  scratch is skipped and the memory holds random codes, which cost the same to export);
- search time of both indexes at equal bytes and nprobe;
- up to ``--ddp-max-size``: steps/s with 1 and 2 processes (torch.distributed, gloo), same global
  batch, and each rank's peak and resident memory; with ``--sharded`` also 2 processes whose id
  tables are sharded row-wise by TorchRec (``poeem train --table-sharding torchrec``).

The towers are untrained (random embeddings): the numbers are costs, not quality.

    python benchmarks/scale.py                                 # 100k, 1M, 10M items
    python benchmarks/scale.py --sizes 100000 --steps 5        # a quick look
    python benchmarks/scale.py --sizes 1000000 10000000 50000000 --processes-only --sharded \
        --replicated-max-size 10000000 --ddp-max-size 50000000 \
        --results-name scale_sharded                           # replicated against sharded tables
    python benchmarks/scale.py --sizes 50000000 --faiss-max-size 0 --ddp-max-size 0 --steps 300
    python benchmarks/scale.py --sizes 100000000 --table-dtype bfloat16 --scratch-max-size 0 \
        --faiss-max-size 0 --ddp-max-size 0 --steps 300     # 100M rows in 12.8 GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

import faiss
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from poeem import distributed
from poeem.export import export_learned
from poeem.export.item_codes import item_codes
from poeem.index import PoeemConfig, PoeemLayer
from poeem.model import ModelConfig, TwoTowerModel
from poeem.model.config import TableDtype
from poeem.search.faiss_backend import untrained_faiss_index
from poeem.training import TrainConfig, Trainer
from poeem.training.config import TableOptimizerName

from common import save_result, timed_steps_per_s

DIM, NUM_QUERIES, SEARCH_QUERIES = 64, 100_000, 10_000


class RandomPairs:
    """Uniform (query, item) batches; under torch.distributed each rank takes its share."""

    def __init__(self, num_items: int, batch_size: int) -> None:
        self.num_items, self.batch_size = num_items, batch_size

    def __len__(self) -> int:
        return 1 << 30

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        q = torch.randint(NUM_QUERIES, (self.batch_size,), generator=g)
        i = torch.randint(self.num_items, (self.batch_size,), generator=g)
        share = distributed.shard(self.batch_size)
        return {"query_ids": q[share], "item_ids": i[share]}


def coarse_lists(n: int) -> int:
    """The power of two nearest sqrt(n)."""
    return 1 << round(math.log2(math.sqrt(n)))


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, GB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def steps_per_s(model: TwoTowerModel, args: argparse.Namespace) -> float:
    """Training steps/s after ``args.warm`` untimed steps (which allocate the optimizer state)."""
    cfg = TrainConfig(
        epochs=1,
        batch_size=args.batch_size,
        lr=1e-3,
        table_optimizer=args.table_optimizer,
        table_lr=0.05,
        progress=False,
        log="none",
        checkpoint_every=0,
    )
    batches = RandomPairs(model.num_items, args.batch_size)
    return timed_steps_per_s(Trainer(model, cfg), batches, args.warm, args.steps)


def layer_config(n: int, kmeans_iters: int, init: str = "kmeans") -> dict[str, Any]:
    k = coarse_lists(n)
    return {
        "num_coarse": k,
        "num_subspaces": 8,
        "codebook_size": 256,
        "warmup_steps": 0,
        "buffer_size": min(n, 64 * k),
        "kmeans_iters": kmeans_iters,
        "init": init,
        "num_items": n,  # the layer remembers the codes of training (poeem export --from-training)
    }


def search_seconds(index: faiss.Index, xq: np.ndarray, nprobe: int, k: int = 10) -> float:
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    started = time.perf_counter()
    index.search(xq, k, params=params)
    return time.perf_counter() - started


def measure(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every single-process cost for a catalogue of ``n`` items."""
    torch.manual_seed(0)
    layer_cfg = layer_config(n, args.kmeans_iters)
    model = TwoTowerModel(ModelConfig(dim=DIM, table_dtype=args.table_dtype), NUM_QUERIES, n)
    row: dict[str, Any] = {
        "items": n,
        "table_dtype": args.table_dtype,
        "coarse_K": layer_cfg["num_coarse"],
        "train_rows": layer_cfg["buffer_size"],
    }
    row["baseline_steps_per_s"] = steps_per_s(model, args)
    print(f"n={n:,}: baseline {row['baseline_steps_per_s']:.2f} steps/s", flush=True)

    sample_ids = torch.randperm(n, generator=torch.Generator().manual_seed(1))[: layer_cfg["buffer_size"]]
    with torch.no_grad():
        sample = model.encode_items(sample_ids)
    model.index = PoeemLayer(PoeemConfig(dim=DIM, **layer_cfg))
    started = time.perf_counter()
    model.index.initialize(sample)
    row["warm_start_kmeans_s"] = time.perf_counter() - started
    row["poeem_steps_per_s"] = steps_per_s(model, args)
    # the routing term's softmax scores every list: its cost grows with coarse_K, so with n
    routing, model.index.config.routing_weight = model.index.config.routing_weight, 0.0
    row["poeem_no_routing_steps_per_s"] = steps_per_s(model, args)
    model.index.config.routing_weight = routing
    row["peak_rss_training_gb"] = peak_rss_gb()
    print(f"n={n:,}: k-means {row['warm_start_kmeans_s']:.1f}s, layer {row['poeem_steps_per_s']:.2f} steps/s")

    model.eval()
    if n <= args.scratch_max_size:
        started = time.perf_counter()
        codes = item_codes(model, progress=True)
        row["embed_encode_s"] = time.perf_counter() - started
        started = time.perf_counter()
        export_learned(model.index, codes, metric="cosine")  # freed at once: one index alive at a time
        row["export_s"] = time.perf_counter() - started
        print(
            f"n={n:,}: poeem embed+encode+export {row['embed_encode_s'] + row['export_s']:.1f}s", flush=True
        )
    else:
        codes = random_codes(model.index.config, n)
    remember(model.index, codes)
    del codes
    poeem_index = export_from_training(model, row)
    row["peak_rss_export_gb"] = peak_rss_gb()
    with torch.no_grad():
        xq = model.encode_queries(torch.randint(NUM_QUERIES, (SEARCH_QUERIES,))).numpy()
    indexes = {"poeem": poeem_index}
    if n <= args.faiss_max_size:
        indexes["faiss"] = faiss_baseline(model, sample, layer_cfg["num_coarse"], row)
    ivfs = {name: faiss.extract_index_ivf(index) for name, index in indexes.items()}
    row["imbalance"] = {name: ivf.invlists.imbalance_factor() for name, ivf in ivfs.items()}
    row["search_ms_per_query"] = {
        f"{name}@{nprobe}": 1000 * search_seconds(index, xq, nprobe) / SEARCH_QUERIES
        for nprobe in args.nprobes
        for name, index in indexes.items()
    }
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def random_codes(config: PoeemConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) random lists and (n, num_subspaces) random sub-codes: what the layer's memory holds
    in place of a from-scratch encoding (an export costs the same whatever the codes are)."""
    g = torch.Generator().manual_seed(2)
    coarse = torch.randint(config.num_coarse, (n,), generator=g)
    return coarse, torch.randint(
        config.codebook_size, (n, config.num_subspaces), generator=g, dtype=torch.uint8
    )


def remember(layer: PoeemLayer, codes: tuple[torch.Tensor | None, torch.Tensor]) -> None:
    """Record every item's ``codes`` in the layer's memory of training, as a last epoch over the
    catalogue would have recorded them."""
    memory, (coarse, sub) = layer.trained, codes
    assert memory is not None and coarse is not None
    for lo in range(0, memory.num_items, 1 << 20):
        rows = slice(lo, lo + (1 << 20))
        memory.record(torch.arange(memory.num_items)[rows], coarse[rows], sub[rows], int(layer.step))


def export_from_training(model: TwoTowerModel, row: dict[str, Any]) -> Any:
    """Time the exports that reuse the layer's memory of training, its codes
    (``trained_export_s``) and its lists with the residuals encoded (``trained_lists_export_s``,
    the default export, whose FAISS index is returned)."""
    started = time.perf_counter()
    export_learned(model.index, item_codes(model, from_training="codes"), metric="cosine")
    row["trained_export_s"] = time.perf_counter() - started
    started = time.perf_counter()
    _, index = export_learned(model.index, item_codes(model, from_training="lists"), metric="cosine")
    row["trained_lists_export_s"] = time.perf_counter() - started
    print(f"export from training: lists {row['trained_lists_export_s']:.1f}s", flush=True)
    return index


def faiss_baseline(model: TwoTowerModel, sample: torch.Tensor, num_coarse: int, row: dict[str, Any]) -> Any:
    """FAISS IVF-PQ trained on the warm-start sample and filled with every item; times in ``row``."""
    xb_np, sample_np = model.all_item_embeddings().numpy(), sample.numpy()
    started = time.perf_counter()
    baseline = untrained_faiss_index(DIM, f"IVF{num_coarse},PQ8x8", "ip")
    baseline.train(sample_np)
    row["faiss_train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    baseline.add(xb_np)
    row["faiss_add_s"] = time.perf_counter() - started
    print(f"faiss train+add {row['faiss_train_s'] + row['faiss_add_s']:.1f}s", flush=True)
    return baseline


# ------------------------------------------------------------ 1 vs 2 processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resident_gb() -> float:
    """Resident memory of this process now, GB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def ddp_worker(
    rank: int, world: int, port: int, n: int, args: argparse.Namespace, out: str, sharded: bool
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        poeem = layer_config(n, 1, init="random")  # steps/s only: skip the k-means
        config = ModelConfig(dim=DIM, poeem=poeem, table_dtype=args.table_dtype)
        model = TwoTowerModel(config, NUM_QUERIES, n, tables_on_meta=sharded)
        if sharded:  # as poeem train --table-sharding torchrec does: each rank draws its own rows
            from poeem.training.table_sharding import shard_id_tables

            sharding = TrainConfig(
                table_sharding="torchrec", table_optimizer="rowwise_adagrad", table_lr=0.05
            )
            shard_id_tables(model, sharding)
        model.index.initialize(model.all_item_embeddings(rows=slice(0, poeem["buffer_size"])))
        rate = steps_per_s(model, args)
        memory = {"peak_rss_gb": peak_rss_gb(), "resident_after_training_gb": resident_gb()}
        Path(f"{out}.{rank}").write_text(json.dumps({"steps_per_s": rate, **memory}))
    finally:
        dist.destroy_process_group()


def processes(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Steps/s and samples/s of training with the layer on 1 and 2 processes (tables replicated,
    and, with ``--sharded``, sharded by TorchRec), and each rank's memory."""
    out: dict[str, Any] = {}
    variants = [(1, False)] + [(2, False)] * (n <= args.replicated_max_size) + [(2, True)] * args.sharded
    for world, sharded in variants:
        with tempfile.TemporaryDirectory() as tmp:
            base = f"{tmp}/rate"
            mp.spawn(ddp_worker, args=(world, free_port(), n, args, base, sharded), nprocs=world, join=True)
            ranks = [json.loads(Path(f"{base}.{r}").read_text()) for r in range(world)]
        rate = {
            "steps_per_s": ranks[0]["steps_per_s"],
            "samples_per_s": ranks[0]["steps_per_s"] * args.batch_size,
            "peak_rss_gb_rank0": ranks[0]["peak_rss_gb"],
            "peak_rss_gb_per_rank": [r["peak_rss_gb"] for r in ranks],
            "resident_after_training_gb_per_rank": [r["resident_after_training_gb"] for r in ranks],
        }
        name = f"{world}-sharded" if sharded else str(world)
        out[name] = rate
        print(f"n={n:,}: {name} process(es) {rate['steps_per_s']:.2f} steps/s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--batch-size", type=int, default=1024, help="global batch")
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warm", type=int, default=3, help="untimed training steps before")
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--nprobes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--ddp-max-size", type=int, default=10_000_000, help="largest size run on 2 processes")
    p.add_argument("--faiss-max-size", type=int, default=10_000_000, help="largest size FAISS is built for")
    p.add_argument("--table-optimizer", default="rowwise_adagrad", choices=get_args(TableOptimizerName))
    p.add_argument(
        "--sharded", action="store_true", help="also 2 processes with the id tables sharded by TorchRec"
    )
    p.add_argument(
        "--replicated-max-size",
        type=int,
        default=1 << 62,
        help="largest size run on 2 processes with replicated tables (each holds the whole table)",
    )
    p.add_argument("--table-dtype", default="float32", choices=get_args(TableDtype))
    p.add_argument(
        "--scratch-max-size",
        type=int,
        default=1 << 62,
        help="largest size also exported from scratch (every item encoded); above, only from training",
    )
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size
    p.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--results-name", default="scale", help="the results file: benchmarks/results/NAME.json")
    p.add_argument(
        "--processes-only",
        action="store_true",
        help="only the 1- and 2-process training rows (no export, search)",
    )
    args = p.parse_args()

    if args.one is not None:  # a child process: one size, peak memory of its own
        row = {"items": args.one} if args.processes_only else measure(args.one, args)
        if args.one <= args.ddp_max_size:
            row["processes"] = processes(args.one, args)
        args.out.write_text(json.dumps(row))
        return

    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--one", str(n), "--out", str(out)], check=True
            )
            rows.append(json.loads(out.read_text()))
    config = {k: v for k, v in vars(args).items() if k not in ("one", "out", "results_dir", "results_name")}
    result = {
        "config": config | {"dim": DIM, "num_queries": NUM_QUERIES, "search_queries": SEARCH_QUERIES},
        "faiss_threads": faiss.omp_get_max_threads(),
        "faiss_polysemous_training": False,  # see untrained_faiss_index
        "rows": rows,
    }
    print("wrote", save_result(args.results_name, result, args.results_dir))


if __name__ == "__main__":
    main()
