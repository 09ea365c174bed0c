"""Index distillation on embeddings a model already has (issue 17): FAISS OPQ IVF-PQ and ScaNN
(tree + anisotropic hashing, no reorder) against the layer's own k-means/OPQ fit and the same
index distilled from the exact ranking of the training queries, at equal bytes and nprobe. No
model training, no labels in the distillation.

- ``scifact``: all-MiniLM-L6-v2 zero-shot, 16 bytes (PQ16x8, no lists), ndcg@10 on the test
  queries, distilled with the train queries' texts.
- ``ml-100k`` / ``gowalla``: a baseline MF two-tower model trained here (cosine, in-batch
  softmax, logQ), its item embeddings and training users as queries; recall@20 at nprobe 1 and
  over all lists.

    python benchmarks/distill.py --dataset scifact --seeds 0 1 2
    python benchmarks/distill.py --dataset gowalla --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem import PoeemLayer
from poeem.data import DataConfig, load_data
from poeem.evaluation.evaluate import evaluate_retrieval
from poeem.evaluation.metrics import ranking_metrics
from poeem.evaluation.report import query_encoder
from poeem.export import learned_index
from poeem.model import ModelConfig
from poeem.pipeline import load_run, train_run
from poeem.pipeline.config import EvalConfig, RunConfig
from poeem.search import FaissSearcher, FlatIndex, TorchIVFPQ
from poeem.search.faiss_backend import train_faiss_ivfpq
from poeem.training.distill import DistillConfig, distill_index
from poeem.training.trainer import TrainConfig

from common import save_result
from peers import ScannIndex

SETTINGS = {  # (coarse_K, D, K), metric cut-off
    "scifact": ((0, 16, 256), 10),
    "ml-100k": ((8, 8, 16), 20),
    "gowalla": ((16, 8, 256), 20),
}


def shared(name: str) -> Path:
    root = os.environ.get("POEEM_DATA_DIR")
    return Path(root) / name if root else Path(__file__).resolve().parents[2] / "shared" / "datasets" / name


def scifact_task(tiny: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(items, training queries, evaluate(index, nprobe) -> ndcg@10) on MiniLM zero-shot."""
    from poeem.model.text import embed_texts, encoder_fingerprint, load_encoder

    data = load_data(DataConfig(kind="beir", path=str(shared("scifact"))))
    encoder = load_encoder("all-MiniLM-L6-v2")
    key = encoder_fingerprint(encoder, 256)
    docs = torch.nn.functional.normalize(
        embed_texts(encoder, data.item_texts, progress=False, cache_key=key), dim=1
    )
    queries = torch.nn.functional.normalize(
        embed_texts(encoder, data.query_texts, progress=False, cache_key=key), dim=1
    )
    test = data.eval_queries()

    def evaluate(index: Any, nprobe: int) -> float:
        _, ids = index.search(queries[test], 10, nprobe)
        hits = data.test.contains(test, ids.numpy())
        return ranking_metrics(hits, data.test.lengths()[test], (10,))["ndcg@10"]

    return docs, queries[np.unique(data.train_queries)], evaluate


def id_task(name: str, seed: int, workdir: Path, tiny: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A baseline model trained here; (items, training users' embeddings, evaluate -> recall@20)."""
    if name == "ml-100k":
        data_cfg = DataConfig(
            kind="movielens", path=str(shared("ml-100k")), split="random", test_fraction=0.2
        )
        epochs, batch = 20, 1024
    else:
        data_cfg = DataConfig(kind="lightgcn", path=str(shared("gowalla")))
        epochs, batch = 10, 2048
    train = TrainConfig(
        epochs=1 if tiny else epochs,
        batch_size=batch,
        optimizer="adam",
        lr=5e-3,
        seed=seed,
        progress=False,
        log="none",
        checkpoint_every=0,
    )
    model_cfg = ModelConfig(dim=64, score="cosine", temperature=0.1, logq_correction=True)
    run = workdir / f"{name}-{seed}"
    train_run(RunConfig(data_cfg, model_cfg, train, EvalConfig(ks=(20,), faiss_baseline=False)), run)
    cfg, model = load_run(run)
    data = load_data(cfg.data)
    encode = query_encoder(model, data)
    with torch.no_grad():
        items = model.all_item_embeddings()
        queries = encode(np.unique(data.train_queries))

    def evaluate(index: Any, nprobe: int) -> float:
        return evaluate_retrieval(index, encode, data, (20,), nprobe)["recall@20"]

    return items, queries, evaluate


def run_seed(name: str, seed: int, workdir: Path, tiny: bool) -> list[dict[str, Any]]:
    (nc, d, k), _ = SETTINGS[name]
    items, queries, evaluate = scifact_task(tiny) if name == "scifact" else id_task(name, seed, workdir, tiny)
    probes = sorted({1, max(nc, 1)})
    rows = []

    def record(method: str, index: Any, seconds: float, extra: dict[str, Any] | None = None) -> None:
        for nprobe in probes:
            rows.append(
                {
                    "method": method,
                    "nprobe": nprobe,
                    "score": evaluate(index, nprobe),
                    "seconds": seconds,
                    **(extra or {}),
                }
            )
        print(name, seed, method, [round(r["score"], 4) for r in rows[-len(probes) :]], flush=True)

    record("exact", FlatIndex(items, "ip"), 0.0)
    started = time.perf_counter()
    faiss_index = train_faiss_ivfpq(items, nc, d, k, "ip", opq=True, seed=seed)
    record("faiss-opq", FaissSearcher(faiss_index), time.perf_counter() - started)
    started = time.perf_counter()
    scann_index = ScannIndex(items, nc, d, k)  # tree + AH at the same bytes, no reorder
    record("scann", scann_index, time.perf_counter() - started)
    for rotation in ("opq", "givens"):
        layer = PoeemLayer(
            dim=items.shape[1],
            num_subspaces=d,
            codebook_size=k,
            num_coarse=nc,
            rotation=rotation,
            coarse_metric="ip",
            warmup_steps=0,
            buffer_size=max(8192, k),
            seed=seed,
        )
        started = time.perf_counter()
        layer.initialize(items)
        fit_s = time.perf_counter() - started
        if rotation == "opq":
            record("poeem-fit", TorchIVFPQ(learned_index(layer, items), "ip"), fit_s)
        for reassign in (True, False):
            student = copy.deepcopy(layer)
            config = DistillConfig(reassign=reassign, seed=seed, epochs=1 if tiny else DistillConfig.epochs)
            started = time.perf_counter()
            result = distill_index(student, items, queries, config, progress=False)
            seconds = fit_s + time.perf_counter() - started
            index = TorchIVFPQ(learned_index(student, (result.coarse_codes, result.codes)), "ip")
            method = f"poeem-distilled-{rotation}" + ("" if reassign else "-frozen-codes")
            record(method, index, seconds, {"best": result.best})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(SETTINGS), default="scifact")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tiny", action="store_true", help="one epoch everywhere (smoke test)")
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [dict(r, seed=s) for s in args.seeds for r in run_seed(args.dataset, s, Path(tmp), args.tiny)]
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for nprobe in dict.fromkeys(r["nprobe"] for r in rows):
            scores = [r["score"] for r in rows if r["method"] == method and r["nprobe"] == nprobe]
            exact = [r["score"] for r in rows if r["method"] == "exact"]
            summary.append(
                {
                    "method": method,
                    "nprobe": nprobe,
                    "mean": float(np.mean(scores)),
                    "std": float(np.std(scores)),
                    "of_exact": float(np.mean(scores) / np.mean(exact)),
                }
            )
    (nc, d, k), cutoff = SETTINGS[args.dataset]
    metric = "ndcg@10" if args.dataset == "scifact" else f"recall@{cutoff}"
    payload = {"dataset": args.dataset, "budget": {"num_coarse": nc, "num_subspaces": d, "codebook_size": k}}
    payload |= {"metric": metric, "seeds": args.seeds, "summary": summary, "runs": rows}
    save_result(f"distill_{args.dataset}" + ("_tiny" if args.tiny else ""), payload, args.results_dir)


if __name__ == "__main__":
    main()
