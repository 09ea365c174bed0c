"""Search cost: codes scanned from real query routing, and the lists' imbalance factor."""

import faiss
import numpy as np
import pytest
import torch
from conftest import DIM, tiny_config, trained_layer

from poeem.evaluation.cost import codes_scanned, imbalance_factor, list_sizes
from poeem.export import to_faiss


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_codes_scanned_matches_brute_force_routing(metric: str) -> None:
    layer, x = trained_layer("givens", 8, coarse_metric="l2" if metric == "l2" else "ip")
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    index = to_faiss(layer, x, metric=metric)
    coarse_codes, _ = layer.encode(x)
    sizes = np.bincount(coarse_codes.long().numpy(), minlength=8)
    assert list_sizes(index).tolist() == sizes.tolist()
    xq = torch.randn(50, DIM) * 2
    q = torch.nn.functional.normalize(xq, dim=1) if metric == "cosine" else xq
    qr = q @ layer.rotation_matrix.detach()  # the routing the index does: rotate, then probe
    centroids = layer.coarse.detach()
    score = -torch.cdist(qr, centroids) if metric == "l2" else qr @ centroids.T
    for nprobe in (1, 3):
        probed = score.topk(nprobe, dim=1).indices.numpy()
        np.testing.assert_array_equal(codes_scanned(index, xq, nprobe), sizes[probed].sum(1))


def test_imbalance_factor_is_faiss_s() -> None:
    layer, x = trained_layer("none", 8)
    index = to_faiss(layer, x)
    ivf = faiss.extract_index_ivf(index)
    assert imbalance_factor(list_sizes(index)) == pytest.approx(ivf.invlists.imbalance_factor(), rel=1e-6)
    assert imbalance_factor(np.array([5, 5, 5, 5])) == 1.0
    assert imbalance_factor(np.array([20, 0, 0, 0])) == 4.0


def test_a_flat_index_scans_everything() -> None:
    layer, x = trained_layer("none", 0)
    index = to_faiss(layer, x)
    assert list_sizes(index) is None
    assert codes_scanned(index, torch.randn(3, DIM), 1).tolist() == [len(x)] * 3


def test_evaluation_rows_report_the_cost(tmp_path) -> None:
    from poeem.pipeline import train_run

    _, metrics = train_run(tiny_config(), tmp_path / "run")
    rows = {r["method"]: r for r in metrics["rows"]}
    assert rows["exact"]["codes_scanned"] == 10_000 and rows["exact"]["imbalance"] == 1.0
    assert 0 < rows["poeem"]["codes_scanned"] <= 10_000 and rows["poeem"]["imbalance"] >= 1.0


def test_the_final_evaluation_scores_the_index_poeem_export_writes(tmp_path) -> None:
    """The run's report row of its index scores the FAISS index that `poeem export` writes by
    default (4-bit codes as fast scan), and says which index that is."""
    from poeem.data import load_data
    from poeem.evaluation.evaluate import evaluate_retrieval
    from poeem.model.query_encoder import QueryEncoder
    from poeem.pipeline import export_run, train_run
    from poeem.search import FaissSearcher

    cfg = tiny_config()
    model, metrics = train_run(cfg, tmp_path / "run")
    row = next(r for r in metrics["rows"] if r["method"] == "poeem")
    assert row["index"] == "IVF2,PQ4x4fs"
    assert next(r for r in metrics["rows"] if r["method"] == "exact")["index"] == "Flat"
    searcher = export_run(tmp_path / "run", tmp_path / "ix")
    assert searcher is not None and searcher.manifest.fast_scan
    exported = faiss.read_index(str(tmp_path / "ix" / searcher.manifest.files["faiss"]))
    assert isinstance(faiss.downcast_index(faiss.extract_index_ivf(exported)), faiss.IndexIVFPQFastScan)
    data = load_data(cfg.data)
    encode = QueryEncoder.from_model(model, data).by_rows
    again = evaluate_retrieval(FaissSearcher(exported), encode, data, (10,), row["nprobe"])
    assert again["recall@10"] == row["recall@10"] and again["ndcg@10"] == row["ndcg@10"]
