"""Text retrieval on a BEIR dataset (SciFact): BM25, a sentence-transformers model zero-shot and
fine-tuned, FAISS PQ/OPQ and ScaNN (AH, no reorder) at equal bytes, the layer's own OPQ index
fitted on the final embeddings ("refit") and that index distilled, and the model fine-tuned
jointly with the Poeem layer, its index as trained and distilled, and an RQ coder refitted on it
and distilled (``poeem train --refit rq``). The distillation learns from
the exact ranking of the train queries' texts (no qrels; see benchmarks/distill.py).

Budgets: 48 bytes per document (PQ48x8 on 384 dims, 32x smaller than float32) and 16 bytes
(PQ16x8). SciFact has 5,183 documents, so the indexes are PQ without IVF (coarse_K = 0).
Training uses the train qrels, evaluation the test qrels (ndcg@10, recall@100).

Fine-tuning mode ``query``: the query side fine-tunes its copy of the encoder with a projection
head; documents are embedded once by the frozen encoder (cached), then go through their own head
and, for the poeem rows, the layer.

    python benchmarks/text.py --data-dir ../shared/datasets/scifact --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem.data import DataConfig, load_beir, load_data
from poeem.evaluation.evaluate import evaluate_retrieval
from poeem.evaluation.metrics import ranking_metrics
from poeem.evaluation.report import compare_indexes
from poeem.export import learned_index
from poeem.index.refit import refit_layer
from poeem.model.query_encoder import QueryEncoder
from poeem.pipeline.config import RunConfig
from poeem.pipeline.run import train_run

from common import save_result
from distill import distilled, fitted_layer, served
from peers import ScannIndex, faiss_residual_index

KS = (10, 100)
BUDGETS = {48: 48, 16: 16}  # bytes -> PQ subspaces (K = 256)
ROTATIONS = ("none", "opq", "givens")  # of the jointly trained PQ layer; "rq" trains a residual quantizer
SHOWN = {
    "exact": "exact",
    "faiss-ivfpq": "+ FAISS PQ",
    "faiss-opq-ivfpq": "+ FAISS OPQ,PQ",
    "scann": "+ ScaNN AH",
    "faiss-rq": "+ FAISS RQ",
    "refit": "+ poeem OPQ fit",
    "refit-rq": "+ poeem RQ fit",
    "refit-distilled": "+ poeem OPQ fit, distilled",
    "poeem": "+ its learned index",
    "poeem-distilled": "+ its learned index, distilled (poeem train's default for text)",
    "poeem-refit-rq-distilled": "+ an RQ coder refitted on it, distilled (poeem train --refit rq)",
}


def data_dir(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    if os.environ.get("POEEM_DATA_DIR"):
        return Path(os.environ["POEEM_DATA_DIR"]) / "scifact"
    return Path(__file__).resolve().parents[2] / "shared" / "datasets" / "scifact"


def bm25_row(path: Path) -> dict[str, Any]:
    """BM25 (bm25s, English stop words and Snowball stemming) on the test queries."""
    import bm25s
    import Stemmer

    data = load_beir(path, ("test",))
    stemmer = Stemmer.Stemmer("english")
    started = time.perf_counter()
    retriever = bm25s.BM25()
    tokens = bm25s.tokenize(data.doc_texts, stopwords="en", stemmer=stemmer, show_progress=False)
    retriever.index(tokens, show_progress=False)
    build_s = time.perf_counter() - started
    rows = data.query_rows("test")
    queries = [data.query_texts[r] for r in rows]
    query_tokens = bm25s.tokenize(queries, stopwords="en", stemmer=stemmer, show_progress=False)
    found, _ = retriever.retrieve(query_tokens, k=max(KS), show_progress=False)
    hits = np.zeros(found.shape, dtype=bool)
    relevant = np.zeros(len(rows))
    for i, r in enumerate(rows):
        judged = {d for d, s in data.qrels["test"][data.query_ids[r]].items() if s > 0}
        relevant[i] = len(judged)
        hits[i] = [data.doc_ids[j] in judged for j in found[i]]
    return {"method": "bm25", **ranking_metrics(hits, relevant, KS), "build_s": build_s}


def run_config(
    path: Path, args: argparse.Namespace, seed: int, subspaces: int | None = None, rotation: str = "none"
) -> RunConfig:
    """A fine-tuning run; with ``subspaces`` the document tower ends with the layer (no lists),
    PQ with ``rotation``, or a residual quantizer for rotation "rq"."""
    layer = None
    if subspaces is not None:
        layer = {
            "num_coarse": 0,
            "num_subspaces": subspaces,
            "codebook_size": 256,
            "rotation": "none" if rotation == "rq" else rotation,
            "quantizer": "rq" if rotation == "rq" else "pq",
            "warmup_steps": args.warmup_steps,
            "buffer_size": args.buffer_size,
        }
    text = {"encoder": args.encoder, "mode": args.mode, "encoder_lr": args.encoder_lr}
    return RunConfig.from_dict(
        {
            "data": {"kind": "beir", "path": str(path)},
            "model": {
                "dim": 384,
                "temperature": args.temperature,
                "random_negatives": args.random_negatives,
                "text": text,
                "poeem": layer,
            },
            "train": {
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "seed": seed,
                "progress": False,
                "log": "none",
                "checkpoint_every": 0,
                "eval_every": 10**9,
                "distill_epochs": 0,  # the index as trained; index_rows distils it like the default
                "refit": None,  # and refits it (the poeem-refit-rq-distilled row)
            },
            "eval": {"ks": KS, "nprobes": (1,), "faiss_baseline": False},
        }
    )


def faiss_rows(model: Any, data: Any, budget: int, seed: int) -> list[dict[str, Any]]:
    """Exact, and FAISS PQ and OPQ+PQ trained on the model's document embeddings, at ``budget`` bytes."""
    return compare_indexes(model, data, KS, (1,), True, (0, budget, 256), opq_baseline=True, seed=seed)


def index_rows(model: Any, data: Any, budget: int, seed: int) -> list[dict[str, Any]]:
    """Indexes built on the model's final document embeddings at ``budget`` bytes (no lists): a
    joint model's own index distilled; for a model without the layer, ScaNN, FAISS RQ, the
    layer's OPQ fit and that fit distilled, and the layer's RQ fit. Distilled from the train
    queries' exact top-100, without qrels."""
    features = torch.from_numpy(data.item_features) if data.item_features is not None else None
    items = model.all_item_embeddings(features).cpu()
    encode = QueryEncoder.from_model(model, data).by_rows
    with torch.no_grad():
        queries = encode(np.unique(data.train_queries))

    def row(method: str, index: Any, build_s: float) -> dict[str, Any]:
        return {"method": method, **evaluate_retrieval(index, encode, data, KS, 1), "build_s": build_s}

    if model.index is not None:
        index, seconds, _ = distilled(copy.deepcopy(model.index), items, queries, seed, False, 0.0, k=KS[0])
        rows = [row("poeem-distilled", index, seconds)]
        started = time.perf_counter()  # poeem train --refit rq: an RQ coder refitted in its lists, distilled
        layer = refit_layer(model.index, items, "rq")
        refit_s = time.perf_counter() - started
        index, seconds, _ = distilled(layer, items, queries, seed, False, refit_s, k=KS[0], keep_lists=True)
        return [*rows, row("poeem-refit-rq-distilled", index, seconds)]
    started = time.perf_counter()
    rows = [row("scann", ScannIndex(items, 0, budget, 256), time.perf_counter() - started)]
    started = time.perf_counter()
    rq_index = faiss_residual_index(items, 0, budget, 256, seed)
    rows.append(row("faiss-rq", rq_index, time.perf_counter() - started))
    started = time.perf_counter()
    layer = fitted_layer(items, (0, budget, 256), "opq", seed)
    fit_s = time.perf_counter() - started
    rows.append(row("refit", served(learned_index(layer, items)), fit_s))
    rows.append(row("refit-distilled", *distilled(layer, items, queries, seed, False, fit_s, k=KS[0])[:2]))
    started = time.perf_counter()
    layer = fitted_layer(items, (0, budget, 256), "rq", seed)
    rows.append(row("refit-rq", served(learned_index(layer, items)), time.perf_counter() - started))
    return rows


def summarize(per_seed: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    out = []
    for name, runs in per_seed.items():
        summary: dict[str, Any] = {"method": name, "seeds": len(runs)}
        for key in ("ndcg@10", "recall@100", "train_s", "build_s", "index_bytes"):
            values = [r[key] for r in runs if key in r]
            if values:
                summary[key], summary[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
        out.append(summary)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--encoder", default="all-MiniLM-L6-v2")
    p.add_argument("--mode", default="query", choices=["frozen", "query", "both"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--encoder-lr", type=float, default=2e-5)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--random-negatives", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--buffer-size", type=int, default=4096)
    p.add_argument(
        "--rotations",
        nargs="+",
        default=list(ROTATIONS),
        choices=[*ROTATIONS, "rq"],
        help="the jointly trained layers: PQ with each rotation; rq: a residual quantizer",
    )
    p.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS), help="bytes per document")
    p.add_argument("--no-bm25", action="store_true")
    p.add_argument(
        "--name",
        default="text_scifact",
        help="results file name (a run of some budgets or rotations can sit beside the full one)",
    )
    p.add_argument("--results-dir", type=Path, default=None)
    args = p.parse_args()
    path = data_dir(args.data_dir)
    data = load_data(DataConfig(kind="beir", path=str(path)))
    print(data.summary(), flush=True)

    rows: list[dict[str, Any]] = [] if args.no_bm25 else [bm25_row(path)]
    per_seed: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def record(prefix: str, found: list[dict[str, Any]], budget: int, train_s: float) -> None:
        for r in found:
            exact = r["method"] == "exact"
            name = f"{prefix} {SHOWN[r['method']]}"
            if not exact and f"{budget}B" not in prefix:
                name += f" {budget}B"
            size = {} if exact else {"index_bytes": budget * data.num_items}
            per_seed[name].append(r | size | {"train_s": train_s})
        print(prefix, budget, [(r["method"], round(r["ndcg@10"], 4)) for r in found], flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        zero = run_config(path, args, 0)
        zero.train.epochs = 0  # identity heads: scores exactly like the encoder
        model, _ = train_run(zero, Path(tmp) / "zero")
        for budget in args.budgets:
            found = faiss_rows(model, data, budget, 0)
            found += index_rows(model, data, budget, 0)
            record("zero-shot", found if budget == args.budgets[0] else found[1:], budget, 0.0)
        for seed in args.seeds:
            model, metrics = train_run(run_config(path, args, seed), Path(tmp) / f"ft-{seed}")
            for budget in args.budgets:
                found = faiss_rows(model, data, budget, seed) + index_rows(model, data, budget, seed)
                record(
                    "fine-tuned",
                    found if budget == args.budgets[0] else found[1:],
                    budget,
                    metrics["train_s"],
                )
            for budget in args.budgets:
                for rotation in args.rotations:
                    cfg = run_config(path, args, seed, BUDGETS[budget], rotation)
                    model, metrics = train_run(cfg, Path(tmp) / f"poeem-{seed}-{budget}-{rotation}")
                    found = metrics["rows"] + index_rows(model, data, budget, seed)
                    record(f"poeem-{rotation} {budget}B", found, budget, metrics["train_s"])
    rows += summarize(per_seed)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(
        "wrote",
        save_result(args.name, {"config": config, "data": data.summary(), "rows": rows}, args.results_dir),
    )


if __name__ == "__main__":
    main()
