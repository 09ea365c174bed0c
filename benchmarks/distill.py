"""Index distillation on embeddings a model already has: FAISS OPQ IVF-PQ, FAISS IVF
with a residual quantizer (RQ) and ScaNN (tree + anisotropic hashing, no reorder) against the
layer's own k-means/OPQ fit and the same index distilled from the exact ranking of the training
queries, at equal bytes and nprobe. No model training, no labels in the distillation.

- ``scifact``: all-MiniLM-L6-v2 zero-shot, 16 bytes (PQ16x8, no lists), ndcg@10 on the test
  queries, distilled with the train queries' texts.
- ``ml-100k`` / ``gowalla`` / ``synthetic``: a baseline MF two-tower model trained here with
  the dataset's preset (cosine, in-batch softmax, logQ), its item embeddings and training
  users as queries; the preset's headline metric (recall@20; precision@100 on synthetic). Also the
  FAISS OPQ index distilled (``--from-faiss``), and the fair ablation: the same preset trained
  jointly with the layer ("joint", default variant), then distilled ("joint-distilled"), and
  the same with the paper's losses only ("joint-paper-losses*"), or with a residual quantizer
  (``--joint joint-rq``); their shares of exact are of each model's own exact search ("*-exact").
  The ``*-lists-flat`` rows keep an index's lists with float vectors in them: the ceiling of any
  code in those lists (FAISS's k-means lists; the lists each joint layer trained).

Every row is measured at each power-of-two nprobe up to all lists, with the codes a test query
scans there (its real routing: FAISS's list sizes, ScaNN's leaves), for equal-cost comparisons.

    python benchmarks/distill.py --dataset scifact --seeds 0 1 2
    python benchmarks/distill.py --dataset gowalla --seeds 0
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem import PoeemLayer
from poeem.data import DataConfig, load_data
from poeem.evaluation.evaluate import evaluate_retrieval
from poeem.evaluation.metrics import ranking_metrics
from poeem.export import learned_index
from poeem.export.faiss_codec import build_faiss_index, build_float_lists_index
from poeem.model.query_encoder import QueryEncoder
from poeem.pipeline import load_run, train_run
from poeem.pipeline.config import EvalConfig
from poeem.pipeline.recipe import layer_from_faiss
from poeem.search import FaissSearcher, FlatIndex
from poeem.search.faiss_backend import train_faiss_ivfpq
from poeem.training.distill import DistillConfig, distill_index

from common import command_line, merge_runs, save_result
from peers import ScannIndex, codes_scanned, exact_within_lists, faiss_residual_index
from presets import PAPER_LOSSES, Preset, data_dir, preset
from presets import tiny as tiny_preset

# the joint models' layers: the presets' default variant, the same with the paper's losses only
# (no routing or un-quantized term: cheaper steps; does distillation make up for them?), and with
# a residual quantizer (not run by default)
JOINT = {"joint": {}, "joint-paper-losses": PAPER_LOSSES, "joint-rq": {"quantizer": "rq"}}
DEFAULT_JOINT = ("joint", "joint-paper-losses")
DATASETS = ("gowalla", "ml-100k", "scifact", "synthetic")
SCIFACT_BUDGET = (0, 16, 256)  # (coarse_K, D, K); the id datasets use their presets' budgets


def id_preset(name: str, tiny: bool) -> Preset:
    pre = preset(name)
    return tiny_preset(pre) if tiny else pre


def served_k(name: str, tiny: bool) -> int:
    """The k of the dataset's headline metric (ndcg@10 on SciFact): the depth the guard watches."""
    return 10 if name == "scifact" else int(id_preset(name, tiny).headline.split("@")[1])


def budget_of(name: str, tiny: bool) -> tuple[int, int, int]:
    return SCIFACT_BUDGET if name == "scifact" else id_preset(name, tiny).budget


def scifact_task(tiny: bool) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor]:
    """(items, training queries, evaluate(index, nprobe) -> ndcg@10, test queries) on MiniLM
    zero-shot."""
    from poeem.model.text import embed_texts, encoder_fingerprint, load_encoder

    data = load_data(DataConfig(kind="beir", path=data_dir("scifact", None)))
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

    return docs, queries[np.unique(data.train_queries)], evaluate, queries[test]


def id_task(name: str, seed: int, workdir: Path, tiny: bool, joint: str | None = None) -> tuple[Any, ...]:
    """A model trained here with the dataset's preset (``joint`` None: the baseline, else a
    :data:`JOINT` layer); (items, training users' embeddings, evaluate -> the preset's headline
    metric, test users' embeddings, model)."""
    pre = id_preset(name, tiny)
    cfg = pre.run_config(seed, None if joint is None else "poeem-ip", tuple(sorted({1, pre.budget[0]})))
    if joint is not None:
        cfg.model.poeem.update(JOINT[joint])
    k = served_k(name, tiny)
    cfg.eval = EvalConfig(ks=(k,), faiss_baseline=False)
    run = workdir / f"{name}-{seed}-{joint or 'baseline'}"
    train_run(cfg, run)
    cfg, model = load_run(run)
    data = load_data(cfg.data)
    encode = QueryEncoder.from_model(model, data).by_rows
    with torch.no_grad():
        items = model.all_item_embeddings()
        queries = encode(np.unique(data.train_queries))
        test = encode(data.eval_queries())

    def evaluate(index: Any, nprobe: int) -> float:
        return evaluate_retrieval(index, encode, data, (k,), nprobe)[pre.headline]

    return items, queries, evaluate, test, model


def run_seed(
    name: str,
    seed: int,
    workdir: Path,
    tiny: bool,
    layers: tuple[str, ...] = ("opq", "givens"),
    joint: tuple[str, ...] = DEFAULT_JOINT,
) -> list[dict[str, Any]]:
    nc, d, k = budget_of(name, tiny)
    k_served = served_k(name, tiny)
    if name == "scifact":
        items, queries, evaluate, test = scifact_task(tiny)
    else:
        items, queries, evaluate, test, _ = id_task(name, seed, workdir, tiny)
    # powers of two up to all lists; tiny: a smoke test, as cheap as it gets
    probes = [1] if tiny else sorted({*(2**i for i in range(max(nc, 1).bit_length())), max(nc, 1)})
    rows = []

    def record(method: str, index: Any, seconds: float, extra: dict[str, Any] | None = None) -> None:
        for nprobe in probes:
            rows.append(
                {
                    "method": method,
                    "nprobe": nprobe,
                    "score": evaluate(index, nprobe),
                    "codes_scanned": codes_scanned(index, test, nprobe),
                    "seconds": seconds,
                    **(extra or {}),
                }
            )
        print(name, seed, method, [round(r["score"], 4) for r in rows[-len(probes) :]], flush=True)

    record("exact", FlatIndex(items, "ip"), 0.0)
    started = time.perf_counter()
    faiss_index = train_faiss_ivfpq(items, nc, d, k, "ip", opq=True, seed=seed)
    faiss_s = time.perf_counter() - started
    record("faiss-opq", FaissSearcher(faiss_index), faiss_s)
    started = time.perf_counter()  # the same FAISS index, distilled (poeem distill --from-faiss)
    layer, _ = layer_from_faiss(faiss_index, items.shape[1], None)
    record("faiss-opq-distilled", *distilled(layer, items, queries, seed, tiny, faiss_s, started, k=k_served))
    started = time.perf_counter()
    scann_index = ScannIndex(items, nc, d, k)  # tree + AH at the same bytes, no reorder
    record("scann", scann_index, time.perf_counter() - started)
    started = time.perf_counter()
    rq_index = faiss_residual_index(items, nc, d, k, seed)  # FAISS lists + residual quantizer
    rq_s = time.perf_counter() - started
    record("faiss-rq", rq_index, rq_s)
    if nc:  # FAISS's k-means lists (those of every FAISS row) with exact scores: the codes' ceiling
        record("faiss-lists-flat", exact_within_lists(rq_index, items), rq_s)
    started = time.perf_counter()  # the same, distilled (its items re-encoded greedily, beam 1)
    layer, _ = layer_from_faiss(rq_index.index, items.shape[1], None)
    record("faiss-rq-distilled", *distilled(layer, items, queries, seed, tiny, rq_s, started, k=k_served))
    for kind in layers:
        started = time.perf_counter()
        layer = fitted_layer(items, (nc, d, k), kind, seed)
        fit_s = time.perf_counter() - started
        if kind != "givens":  # the Givens layer's fit is the OPQ fit
            record("poeem-fit" + ("-rq" if kind == "rq" else ""), served(learned_index(layer, items)), fit_s)
        for reassign in (True, False):
            method = f"poeem-distilled-{kind}" + ("" if reassign else "-frozen-codes")
            student = copy.deepcopy(layer)
            result = distilled(student, items, queries, seed, tiny, fit_s, reassign=reassign, k=k_served)
            record(method, *result)
    for variant in joint if name != "scifact" else ():  # joint training, then the same distillation
        started = time.perf_counter()
        items, queries, evaluate, test, model = id_task(name, seed, workdir, tiny, variant)
        joint_s = time.perf_counter() - started
        record(f"{variant}-exact", FlatIndex(items, "ip"), 0.0)
        joint_index = learned_index(model.index, items)
        record(variant, served(joint_index), joint_s)
        if nc:  # the layer's trained lists with float vectors (poeem evaluate --lists-ceiling)
            record(
                f"{variant}-lists-flat", FaissSearcher(build_float_lists_index(joint_index, items)), joint_s
            )
        result = distilled(model.index, items, queries, seed, tiny, joint_s, k=k_served)
        record(f"{variant}-distilled", *result)
    return rows


def fitted_layer(items: torch.Tensor, budget: tuple[int, int, int], kind: str, seed: int) -> PoeemLayer:
    """The layer's own index ("refit") fitted on fixed (n, dim) ``items``: k-means lists, then
    the rotation and codebooks, at ``budget`` = (coarse_K, D, K). ``kind``: the rotation of a PQ
    layer ("opq", "givens"), or "rq" for a residual quantizer."""
    nc, d, k = budget
    layer = PoeemLayer(
        dim=items.shape[1],
        num_subspaces=d,
        codebook_size=k,
        num_coarse=nc,
        rotation="none" if kind == "rq" else kind,
        quantizer="rq" if kind == "rq" else "pq",
        coarse_metric="ip",
        warmup_steps=0,
        buffer_size=max(8192, k),
        seed=seed,
    )
    layer.initialize(items)
    return layer


def served(index: Any) -> FaissSearcher:
    """A learned index as users serve it: exported to FAISS (no training)."""
    return FaissSearcher(build_faiss_index(index, "ip"))


def distilled(
    layer: PoeemLayer,
    items: torch.Tensor,
    queries: torch.Tensor,
    seed: int,
    tiny: bool,
    before_s: float,
    started: float | None = None,
    reassign: bool = True,
    k: int | None = None,
    keep_lists: bool = False,
) -> tuple[Any, float, dict[str, Any]]:
    """Distil ``layer`` in place with the default settings (``keep_lists``: those of a refit,
    :meth:`DistillConfig.keeping_lists`), its guard watching the top ``k`` that the benchmark
    scores; (its index, the seconds since ``started`` or of the distillation alone, plus
    ``before_s``, and the best epoch, the epochs run and the guard's decision)."""
    started = started if started is not None else time.perf_counter()
    config = DistillConfig(reassign=reassign, seed=seed, guard_k=k)
    if keep_lists:
        config = config.keeping_lists()
    if tiny:
        config = replace(config, rounds=1, epochs=1, teacher_k=20)
    result = distill_index(layer, items, queries, config, progress=False)
    seconds = before_s + time.perf_counter() - started
    return (
        served(learned_index(layer, (result.coarse_codes, result.codes))),
        seconds,
        {"best": result.best, "epochs": len(result.history), "kept_start": result.kept_start},
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="scifact")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tiny", action="store_true", help="one epoch everywhere (smoke test)")
    p.add_argument(
        "--layers",
        "--rotations",
        nargs="*",
        default=["opq", "givens"],
        choices=["opq", "givens", "rq"],
        help="the refit layers: PQ with an OPQ or Givens rotation, or a residual quantizer; none (a "
        "bare --layers): only the peers and the joint models",
    )
    p.add_argument(
        "--joint",
        nargs="*",
        default=list(DEFAULT_JOINT),
        choices=list(JOINT),
        help="the joint models to train (id data); none (a bare --joint): only the rows on fixed "
        "embeddings, and with --merge the results file's joint rows stay",
    )
    p.add_argument("--results-dir", type=Path, default=None)
    p.add_argument("--merge", action="store_true", help="keep the results file's runs of other seeds")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            dict(r, seed=s)
            for s in args.seeds
            for r in run_seed(args.dataset, s, Path(tmp), args.tiny, tuple(args.layers), tuple(args.joint))
        ]
    name = f"distill_{args.dataset}" + ("_tiny" if args.tiny else "")
    commands: list[str] = []
    if args.merge:
        rows, commands, _ = merge_runs(name, rows, ("seed", "method", "nprobe"), args.results_dir)
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for nprobe in dict.fromkeys(r["nprobe"] for r in rows):
            scores = [r["score"] for r in rows if r["method"] == method and r["nprobe"] == nprobe]
            model = next((j for j in sorted(JOINT, key=len, reverse=True) if method.startswith(j)), None)
            own = f"{model}-exact" if model else "exact"  # each model's own exact search
            seeds = {r["seed"] for r in rows if r["method"] == method}  # a merged row may have fewer
            exact = [r["score"] for r in rows if r["method"] == own and r["seed"] in seeds]
            scanned = [r["codes_scanned"] for r in rows if r["method"] == method and r["nprobe"] == nprobe]
            summary.append(
                {
                    "method": method,
                    "nprobe": nprobe,
                    "mean": float(np.mean(scores)),
                    "std": float(np.std(scores)),
                    "of_exact": float(np.mean(scores) / np.mean(exact)),
                    "codes_scanned": float(np.mean(scanned)),
                }
            )
    nc, d, k = budget_of(args.dataset, args.tiny)
    metric = "ndcg@10" if args.dataset == "scifact" else id_preset(args.dataset, args.tiny).headline
    payload = {"dataset": args.dataset, "budget": {"num_coarse": nc, "num_subspaces": d, "codebook_size": k}}
    seeds = sorted({r["seed"] for r in rows})
    payload |= {"metric": metric, "seeds": seeds, "summary": summary, "runs": rows}
    if commands:
        payload["commands"] = [*commands, command_line()]
    save_result(name, payload, args.results_dir)


if __name__ == "__main__":
    main()
