"""Each benchmark script runs end to end on a tiny configuration, so the scripts cannot rot."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_SCALE = ["--sizes", "5000", "--steps", "2", "--warm", "1", "--kmeans-iters", "2"]


def run(script: str, *args: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        cwd=BENCH,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def run_lanes(lanes: list[list[tuple[str, ...]]]) -> None:
    """Run each lane's (script, *args) commands in order, the lanes side by side, one torch
    thread each: the scripts' starts and Python loops overlap instead of queueing."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with ThreadPoolExecutor(len(lanes)) as pool:
        done = [pool.submit(lambda lane=lane: [run(*cmd, env=env) for cmd in lane]) for lane in lanes]
        for future in done:
            future.result()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = str(tmp_path_factory.mktemp("results"))
    synthetic = ("--dataset", "synthetic", "--tiny")
    run_lanes(
        [
            [
                ("recall.py", *synthetic, "--seeds", "0", "--variants", "poeem", "--results-dir", out),
                (
                    "recall.py",
                    *synthetic,
                    "--seeds",
                    "0",
                    "--variants",
                    "poeem-ip",
                    "--merge",
                    "--results-dir",
                    out,
                ),
                ("scale.py", *TINY_SCALE, "--results-dir", out),
                (
                    "serve_load.py",
                    "--items",
                    "5000",
                    "--requests",
                    "100",
                    "--clients",
                    "1",
                    "8",
                    "--results-dir",
                    out,
                ),
                ("coarse_fit.py", "--results-dir", out),
                (
                    "backend_agreement.py",
                    "--items",
                    "3000",
                    "--nlist",
                    "8",
                    "--queries",
                    "50",
                    "--results-dir",
                    out,
                ),
                (
                    "frontier.py",
                    *synthetic,
                    "--methods",
                    "poeem",
                    "poeem-k256",
                    "faiss-ivfpq",
                    "hnsw",
                    "--results-dir",
                    out,
                ),
                (
                    "search_speed.py",
                    "--n",
                    "30000",
                    "--queries",
                    "50",
                    "--repeats",
                    "1",
                    "--results-dir",
                    out,
                ),
            ],
            [
                ("sweep.py", *synthetic, "--results-dir", out),
                (
                    "export_speed.py",
                    "--n",
                    "20000",
                    "--nlist",
                    "32",
                    "--fit-sample",
                    "5000",
                    "--results-dir",
                    out,
                ),
                ("trained_codes.py", *synthetic, "--seeds", "0", "--results-dir", out),
                ("fit_spread.py", *synthetic, "--fit-seeds", "0", "1", "--results-dir", out),
                ("ablation.py", *synthetic, "--options", "none", "default", "--results-dir", out),
                # the sparse row-wise path; dense tables train in every other script
                (
                    "sparse_tables.py",
                    *synthetic,
                    "--seeds",
                    "0",
                    "--table-optimizers",
                    "rowwise_adagrad_bf16",
                    "--results-dir",
                    out,
                ),
                (
                    "update_cost.py",
                    *("--items", "5000", "--adds", "10", "--clients", "2"),
                    *("--remove-items", "5000", "--nlist", "16", "--queries", "20", "--repeats", "1"),
                    *("--results-dir", out),
                ),
                (
                    "train_cost.py",
                    *synthetic,
                    "--steps",
                    "3",
                    "--warm",
                    "1",
                    "--repeats",
                    "1",
                    "--profile",
                    "--settings",
                    "no layer",
                    "layer, defaults",
                    "layer, defaults, givens rotation",
                    "--results-dir",
                    out,
                ),
            ],
        ]
    )
    return Path(out)


def test_the_fit_spread_has_every_seed_at_every_nprobe(results: Path) -> None:
    spread = json.loads((results / "fit_spread_synthetic_tiny.json").read_text())
    nprobes = [1, 2, 4]  # the tiny configuration's 4 lists
    assert [(r["fit_seed"], r["nprobe"]) for r in spread["runs"]] == [(s, n) for s in (0, 1) for n in nprobes]
    assert [e["nprobe"] for e in spread["summary"]] == nprobes
    for entry in spread["summary"]:
        seeds = [r["recall"] for r in spread["runs"] if r["nprobe"] == entry["nprobe"]]
        assert entry["recall"] == pytest.approx(np.mean(seeds)) and 0 < entry["recall"] <= 1


def test_benchmarks_write_results(results: Path) -> None:
    export = json.loads((results / "export_speed.json").read_text())
    assert export["faiss_train_add_s"] > 0 and export["poeem_export_from_codes_s"] > 0
    assert "cpu" in export["machine"] and export["command"].startswith("python ")
    speed = json.loads((results / "search_speed.json").read_text())
    assert {(r["backend"], r["nprobe"]) for r in speed["rows"]} == {
        (b, p) for b in ("faiss", "torch") for p in (1, 8)
    }
    assert all(r["topk_overlap_with_faiss"] > 0.99 for r in speed["rows"] if r["backend"] == "torch")
    agreement = json.loads((results / "backend_agreement.json").read_text())["rows"]
    assert [(r["backend"], r["nprobe"]) for r in agreement] == [
        (b, p) for p in (1, 8) for b in ("torch", "torch, float formula")
    ]
    assert all(r["same_ids_above_ties"] > 0.95 for r in agreement if r["backend"] == "torch")
    fits = {(r["rule"], r["fit"]): r for r in json.loads((results / "coarse_fit.json").read_text())["rows"]}
    assert fits[("ip", "equal_norm")]["empty_lists"] == 0
    assert fits[("ip", "equal_norm")]["relative_distortion"] < fits[("ip", "kmeans")]["relative_distortion"]
    load = json.loads((results / "serve_load.json").read_text())
    assert load["total_failures"] == 0 and [(r["batch"], r["clients"]) for r in load["rows"]] == [
        (1, 1),
        (1, 8),
        (32, 1),
        (32, 8),
    ]
    assert load["rows"][1]["reload_and_add_statuses"] == [200, 200]
    update = json.loads((results / "update_cost.json").read_text())
    assert update["quiet"]["failures"] == update["under_search_load"]["failures"] == 0
    assert 0 < update["quiet"]["bytes_written_mean"] < update["compaction"]["bytes_written"]
    removes = update["removes"]["rows"]
    assert [(r["index"], r["removed_share"]) for r in removes] == [
        (index, share) for index in ("PQ16x4fs", "IVF16,PQ16x4fs") for share in (0.0, 0.01, 0.05, 0.1)
    ]
    assert {r["filter"] for r in removes if r["removed"]} == {"over-fetch", "id selector"}
    assert all(r["ms_one_query"] > 0 and r["same_ids_as_rebuilt"] == 1.0 for r in removes)
    frontier = json.loads((results / "frontier_synthetic_tiny.json").read_text())
    assert {"dataset", "headline", "num_items", "threads", "exact", "rows", "lists"} <= set(frontier)
    assert frontier["threads"] == 1 and frontier["exact"]["qps"] > 0 and 0 < frontier["exact"]["recall"] <= 1
    keys = {"method", "default", "bytes_per_item", "setting", "recall", "qps", "build_s"}
    assert all(keys <= set(row) for row in frontier["rows"])
    assert {row["method"] for row in frontier["rows"] if row["default"]} == {"poeem"}
    assert {row["method"] for row in frontier["rows"]} == {
        "poeem",
        "poeem-k256",
        "faiss-ivfpq",
        "hnsw",
    }
    assert {row["bytes_per_item"] for row in frontier["rows"] if row["method"] != "hnsw"} == {4}
    settings = {row["setting"] for row in frontier["rows"] if row["method"] == "faiss-ivfpq"}
    assert settings == {"nprobe=1", "nprobe=2", "nprobe=4"}  # 1 to all lists
    assert all(row["qps"] > 0 and 0 <= row["recall"] <= 1 for row in frontier["rows"])
    recall = json.loads((results / "recall_synthetic_tiny.json").read_text())
    methods = {row["method"] for row in recall["summary"]}
    peers = {"exact", "faiss-ivfpq", "faiss-opq-ivfpq", "faiss-rq", "scann"}
    assert methods == peers | {"poeem", "poeem-ip"}
    assert len(recall["commands"]) == 2 and "--merge" in recall["commands"][1]
    assert all(0 <= row["precision@100"] <= 1 for row in recall["summary"])
    scale = json.loads((results / "scale.json").read_text())["rows"][0]
    assert scale["items"] == 5000 and set(scale["processes"]) == {"1", "2"}
    assert (
        scale["poeem_steps_per_s"] > 0
        and scale["poeem_no_routing_steps_per_s"] > 0
        and scale["search_ms_per_query"]["poeem@1"] > 0
    )
    assert scale["trained_export_s"] > 0 and scale["trained_lists_export_s"] > 0
    assert all("codes_scanned" in row for row in recall["summary"] if row["method"] != "exact")
    for peer in ("scann", "faiss-rq"):
        assert {row["nprobe"] for row in recall["summary"] if row["method"] == peer} == {1, 2}
    sparse = json.loads((results / "sparse_tables_synthetic_tiny.json").read_text())["summary"]
    assert [(r["table_optimizer"], r["model"]) for r in sparse] == [
        ("rowwise_adagrad_bf16", "baseline"),
        ("rowwise_adagrad_bf16", "poeem-ip"),
    ]
    cost = json.loads((results / "train_cost_synthetic_tiny.json").read_text())["runs"]
    assert [r["setting"] for r in cost] == ["no layer", "layer, defaults", "layer, defaults, givens rotation"]
    assert cost[0]["time_vs_no_layer"] == 1.0 and all(r["steps_per_s"] > 0 for r in cost)
    profiled = cost[2]["profile_ms"]  # the parts of a step, each a share of the whole
    assert 0 < profiled["rotation"] < profiled["layer forward"] < profiled["step (profiled)"]
    assert "profile_ms" not in cost[0] and profiled["backward"] > 0
    ablation = json.loads((results / "ablation_synthetic_tiny.json").read_text())
    assert [r["option"] for r in ablation["summary"]] == ["none", "default"]
    assert ablation["runs"][0]["layer"]["routing_weight"] == 0 and ablation["runs"][1]["layer"] == {}
    sweep = json.loads((results / "sweep_synthetic_tiny.json").read_text())
    assert [p["parameter"] for p in sweep["points"]] == ["D", "D", "K", "coarse_K"]
    trained = json.loads((results / "trained_codes_synthetic_tiny.json").read_text())
    modes = [(e["mode"], e["nprobe"]) for e in trained["summary"]]
    assert modes == [(m, p) for m in ("re-encoded", "trained lists", "trained") for p in (1, 2)]


def test_report_renders_tables_and_plots(results: Path, tmp_path: Path) -> None:
    tiny = (
        "recall_synthetic",
        "sweep_synthetic",
        "ablation_synthetic",
        "train_cost_synthetic",
        "frontier_synthetic",
    )
    for name in (f"{t}_tiny" for t in tiny):  # the report skips *_tiny files
        (results / f"{name}.json").rename(results / f"{name.replace('_tiny', '')}.json")
    (results / "sweep_synthetic.json").rename(results / "sweep_gowalla.json")
    run("report.py", "--results-dir", str(results), "--docs-dir", str(tmp_path))
    text = (tmp_path / "benchmarks.md").read_text()
    assert "zero-training export vs FAISS" in text and "Retrieval quality: synthetic" in text
    assert "Search time of the index directory's backends" in text and "`poeem serve` under load" in text
    assert "Command: `python " in text and "Scale: how each cost grows" in text
    assert "Updates: what adding one item costs" in text
    assert (tmp_path / "img" / "scale.png").is_file()
    assert (tmp_path / "img" / "recall_synthetic_nprobe.png").is_file()
    assert (tmp_path / "img" / "sweep.png").is_file()
    assert "Training cost: synthetic" in text and "| layer, defaults |" in text
    assert "Ablation: synthetic" in text and (tmp_path / "img" / "ablation_synthetic.png").is_file()
    assert (tmp_path / "img" / "recall_synthetic_scanned.png").is_file()
    assert "### synthetic, 4 bytes per item: precision@100 against queries per second" in text
    assert (tmp_path / "img" / "frontier_synthetic.png").is_file()


def peer_task() -> tuple[Any, Any, Any]:
    """Clustered (4000, 32) items, 50 queries near some of them, and their exact top 10."""
    import torch

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(40, 32, generator=g)
    items = centers[torch.randint(40, (4000,), generator=g)] + 0.3 * torch.randn(4000, 32, generator=g)
    queries = items[:50] + 0.1 * torch.randn(50, 32, generator=g)
    return items, queries, (queries @ items.T).topk(10).indices


def overlap_at_10(ids: Any, exact: Any) -> float:
    """Mean share of each query's exact top 10 among its (50, 10) ``ids``."""
    return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, exact, strict=True)) / 500


def test_scann_peer_searches_at_equal_bytes() -> None:
    """The ScaNN peer (tree + AH, no reorder) finds most exact neighbours on clustered data."""
    sys.path.insert(0, str(BENCH))
    try:
        from peers import ScannIndex
    finally:
        sys.path.remove(str(BENCH))
    import torch

    items, queries, exact = peer_task()
    index = ScannIndex(items, num_coarse=8, num_subspaces=8, codebook_size=256)
    scores, ids = index.search(queries, 10, nprobe=8)
    assert ids.shape == scores.shape == (50, 10) and ids.dtype == torch.int64
    overlap = overlap_at_10(ids, exact)
    assert overlap > 0.5
    _, one_leaf = index.search(queries, 10, nprobe=1)
    assert not torch.equal(one_leaf, ids) or overlap == 1.0  # fewer leaves, another answer
    scanned = np.stack([index.codes_scanned(queries, nprobe) for nprobe in (1, 2, 4, 8)])
    assert (np.diff(scanned, axis=0) >= 0).all() and (scanned[-1] == 4000).all()  # all leaves: all items
    assert 0 < scanned[0].mean() < 4000 / 2  # one leaf of eight
    with pytest.raises(ValueError, match="dim % D"):
        ScannIndex(items, 8, 5, 256)


def test_faiss_residual_peer_is_at_equal_bytes_and_finds_the_neighbours() -> None:
    """FAISS IVF + RQ at (D, K) stores D * log2(K) / 8 bytes per item, as IVF-PQ, and ranks like
    exact search on clustered data; more lists probed never scan fewer codes."""
    sys.path.insert(0, str(BENCH))
    try:
        from peers import codes_scanned, faiss_residual_index
    finally:
        sys.path.remove(str(BENCH))
    import faiss

    items, queries, exact = peer_task()
    four_bit = faiss_residual_index(items, 8, 4, 16)
    assert faiss.extract_index_ivf(four_bit.index).code_size == 2
    searcher = faiss_residual_index(items, 8, 8, 256)
    assert faiss.extract_index_ivf(searcher.index).code_size == 8
    _, ids = searcher.search(queries, 10, nprobe=8)
    assert overlap_at_10(ids, exact) > 0.5
    scanned = [codes_scanned(searcher, queries, nprobe) for nprobe in (1, 2, 4, 8)]
    assert scanned == sorted(scanned) and scanned[-1] == 4000 and scanned[0] < 4000 / 2


def test_exact_within_lists_ranks_each_querys_probed_lists_exactly() -> None:
    """The codes' ceiling row: an IVF index's own lists with float vectors; at nprobe 1 each
    query gets the exact top 10 of the items in the list it is routed to, and all lists give
    exact search."""
    sys.path.insert(0, str(BENCH))
    try:
        from peers import exact_within_lists, faiss_residual_index
    finally:
        sys.path.remove(str(BENCH))
    import faiss
    import torch

    items, queries, exact = peer_task()
    flat = exact_within_lists(faiss_residual_index(items, 8, 4, 16), items)
    _, all_lists = flat.search(queries, 10, nprobe=8)
    assert torch.equal(all_lists, exact)
    quantizer = faiss.extract_index_ivf(flat.index).quantizer
    _, item_list = quantizer.search(items.numpy(), 1)
    _, query_list = quantizer.search(queries.numpy(), 1)
    scores = queries @ items.T
    scores[torch.from_numpy(query_list != item_list.T)] = float("-inf")
    _, one_list = flat.search(queries, 10, nprobe=1)
    assert torch.equal(one_list, scores.topk(10).indices)


def test_distillation_benchmark_has_every_peer_and_the_joint_rows(tmp_path: Path) -> None:
    args = ["--dataset", "synthetic", "--tiny", "--layers", "opq", "rq", "--results-dir", str(tmp_path)]
    run("distill.py", *args)
    result = json.loads((tmp_path / "distill_synthetic_tiny.json").read_text())
    methods = [row["method"] for row in result["summary"]]
    assert methods == [
        "exact",
        "faiss-opq",
        "faiss-opq-distilled",
        "scann",
        "faiss-rq",
        "faiss-lists-flat",
        "faiss-rq-distilled",
        "poeem-fit",
        "poeem-distilled-opq",
        "poeem-distilled-opq-frozen-codes",
        "poeem-fit-rq",
        "poeem-distilled-rq",
        "poeem-distilled-rq-frozen-codes",
        "joint-exact",
        "joint",
        "joint-lists-flat",
        "joint-distilled",
        "joint-paper-losses-exact",
        "joint-paper-losses",
        "joint-paper-losses-lists-flat",
        "joint-paper-losses-distilled",
    ]
    assert result["metric"] == "precision@100"  # the synthetic preset's headline
    assert all(0 <= row["mean"] <= 1 for row in result["summary"])
    assert all(r["of_exact"] == 1.0 for r in result["summary"] if r["method"].endswith("exact"))
    scanned = {r["method"]: r["codes_scanned"] for r in result["summary"]}
    assert scanned["exact"] == scanned["joint-exact"] == 10_000  # every synthetic item
    assert all(0 < v < 10_000 for m, v in scanned.items() if not m.endswith("exact"))  # one list of two
    (tmp_path / "distill_synthetic_tiny.json").rename(tmp_path / "distill_synthetic.json")  # as report reads
    docs = tmp_path / "docs"
    run("report.py", "--results-dir", str(tmp_path), "--docs-dir", str(docs))
    text = (docs / "benchmarks.md").read_text()
    assert "### Distillation: synthetic" in text and "| codes scanned |" in text
    distilled_rows = [line for line in text.splitlines() if line.startswith("| joint-distilled |")]
    assert distilled_rows and distilled_rows[0].endswith("| 1.0 |")  # tiny: one epoch run
    assert (docs / "img" / "distill_synthetic_scanned.png").is_file()


def test_merge_runs_replaces_the_rerun_seeds_and_keeps_the_others(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCH))
    from common import merge_runs

    old = [{"seed": s, "method": m, "score": 1.0} for s in (0, 1) for m in ("a", "b")]
    record = {"command": "python benchmarks/x.py --seeds 0 1", "runs": old}
    (tmp_path / "x.json").write_text(json.dumps(record))
    new = [{"seed": 1, "method": "a", "score": 2.0}]
    runs, commands, kept = merge_runs("x", new, ("seed", "method"), tmp_path)
    assert [(r["seed"], r["method"], r["score"]) for r in runs] == [
        (0, "a", 1.0),
        (0, "b", 1.0),
        (1, "b", 1.0),
        (1, "a", 2.0),
    ]
    assert commands == ["python benchmarks/x.py --seeds 0 1"] and kept == record
    assert merge_runs("missing", new, ("seed",), tmp_path) == (new, [], {})


def test_rerank_peers_rescore_more_candidates_with_larger_factors(tmp_path: Path) -> None:
    """The re-ranking group's peers (FAISS Refine(SQ8), ScaNN int8 reorder) take (nprobe, F),
    find more exact neighbours than their codes alone, and rerank_cost.py writes its timings."""
    sys.path.insert(0, str(BENCH))
    try:
        from peers import RefinedFaiss, ScannIndex
    finally:
        sys.path.remove(str(BENCH))
    items, queries, exact = peer_task()
    refined = RefinedFaiss(items.numpy(), "IVF8,PQ4x4fs,Refine(SQ8)", seed=0)
    codes_only = overlap_at_10(refined.search(queries, 10, (8, 1.0))[1], exact)
    reranked = overlap_at_10(refined.search(queries, 10, (8, 8.0))[1], exact)
    assert reranked > codes_only + 0.3  # 2 bytes of codes alone find few of them
    scann = ScannIndex(
        items, num_coarse=8, num_subspaces=4, codebook_size=16, reorder="int8", max_candidates=80
    )
    assert overlap_at_10(scann.search(queries, 10, (8, 8.0))[1], exact) > overlap_at_10(
        scann.search(queries, 10, (8, 1.0))[1], exact
    )
    run(
        "rerank_cost.py",
        "--items",
        "3000",
        "--lists",
        "16",
        "--queries",
        "5",
        "--repeats",
        "1",
        "--results-dir",
        str(tmp_path),
    )
    cost = json.loads((tmp_path / "rerank_cost.json").read_text())
    assert [row["precision"] for row in cost["rows"]] == ["sq8", "fp16", "float"]
    assert all(row["rescore"]["batch_ms"] > 0 and row["rescore_share_batch"] > 0 for row in cost["rows"])
