"""The residual quantizer (``quantizer="rq"``): D stages of full-dimensional codewords."""

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import assert_same_topk, clustered, distill_from_faiss_file, trained_layer
from faiss.contrib.inspect_tools import get_invlist
from typer.testing import CliRunner

from poeem import PoeemError, PoeemLayer, Searcher
from poeem.cli import app
from poeem.export import learned_index, to_faiss
from poeem.export.faiss_codec import build_faiss_index, pack_sa_codes, read_faiss_quantizer
from poeem.index.kmeans import kmeans
from poeem.index.quantize import fit_residual_codebooks, pq_reconstruct, rq_assign
from poeem.pipeline.recipe import layer_from_faiss
from poeem.search import FaissSearcher, TorchIVFPQ
from poeem.training.distill import DistillConfig, distill_index

DIM, D = 16, 4


def rq_layer(
    num_coarse: int = 8, k: int = 16, coarse_metric: str = "ip", quantizer: str = "rq"
) -> tuple[PoeemLayer, torch.Tensor]:
    return trained_layer("none", num_coarse, k, coarse_metric, quantizer)


@pytest.mark.parametrize("num_coarse", [0, 8])
def test_codes_are_the_greedy_stage_by_stage_choice(num_coarse: int) -> None:
    layer, x = rq_layer(num_coarse, coarse_metric="l2")
    assert layer.codebooks.shape == (D, 16, DIM)  # every codeword spans every coordinate
    coarse_codes, codes = layer.encode(x, batch_size=300)
    left = x.clone()
    if num_coarse:
        lists = torch.cdist(x, layer.coarse.detach()).argmin(1)
        assert torch.equal(coarse_codes.long(), lists)
        left -= layer.coarse.detach()[lists]
    for stage in range(D):
        words = layer.codebooks.detach()[stage]
        best = torch.cdist(left, words).argmin(1)
        assert torch.equal(codes[:, stage].long(), best)
        left -= words[best]
    recon = layer.decode(coarse_codes, codes)
    torch.testing.assert_close(recon, x - left, atol=1e-4, rtol=1e-5)  # the sum of the codewords


def test_gradients_pass_straight_through_and_train_every_stage() -> None:
    layer, x = rq_layer()
    batch = x[:64].clone().requires_grad_(True)
    out = layer(batch)
    upstream = torch.randn_like(batch)
    (out.output * upstream).sum().backward(retain_graph=True)
    torch.testing.assert_close(batch.grad, upstream)
    assert layer.codebooks.grad is None or not layer.codebooks.grad.any()
    out.loss.backward()
    assert (layer.codebooks.grad.abs().sum(dim=(1, 2)) > 0).all()  # each stage's codewords move


def test_lower_distortion_than_product_quantization_at_equal_bytes() -> None:
    distortion = {}
    for quantizer in ("pq", "rq"):
        layer, x = rq_layer(num_coarse=0, quantizer=quantizer)
        distortion[quantizer] = float((layer.decode(*layer.encode(x)) - x).pow(2).sum(1).mean())
    assert distortion["rq"] < 0.9 * distortion["pq"], distortion


def stagewise_kmeans(x: torch.Tensor, stages: int, k: int) -> torch.Tensor:
    """Reference: a full-dimension k-means per stage on what the stages before it left."""
    left, books = x.clone(), []
    for stage in range(stages):
        words = kmeans(left, k, iters=20, seed=stage)
        left -= words[torch.cdist(left, words).argmin(1)]
        books.append(words)
    return torch.stack(books)


def test_few_points_per_codeword_are_coded_evenly_not_memorised() -> None:
    """1,000 isotropic 256-d vectors, 4 per codeword (the text regime): the fitted stages shrink
    and every vector is coded about as well; a full-dimension k-means per stage instead spends
    codewords on single vectors (coded almost exactly, the rest worse, late stages large)."""
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(1000, 256, generator=g), dim=1)

    def errors(books: torch.Tensor) -> torch.Tensor:
        return (pq_reconstruct(rq_assign(x, books), books, 256) - x).pow(2).sum(1)

    books = fit_residual_codebooks(x, 8, 32, 20, 0)
    assert books.shape == (8, 32, 256)
    norms = books.norm(dim=2).mean(1)
    assert (norms[1:] < norms[:-1]).all(), norms
    fitted, memorising = errors(books), errors(stagewise_kmeans(x, 8, 32))
    assert fitted.mean() < memorising.mean()
    assert fitted.std() / fitted.mean() < 0.5 * memorising.std() / memorising.mean()
    assert (fitted > 0.5 * fitted.mean()).all() and (memorising < 0.1 * memorising.mean()).sum() > 20


@pytest.mark.parametrize("num_coarse", [0, 8])
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_faiss_export_scores_as_our_search_and_the_reconstructions(num_coarse: int, metric: str) -> None:
    layer, x = rq_layer(num_coarse, coarse_metric="l2" if metric == "l2" else "ip")
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    ids = torch.arange(len(x)) * 7 + 5_000_000_000
    index = to_faiss(layer, x, ids, metric)
    ix = learned_index(layer, x, ids)
    xq = torch.randn(30, DIM) * 3
    nprobe = num_coarse or 1
    d1, i1 = FaissSearcher(index).search(xq, 15, nprobe)
    d2, i2 = TorchIVFPQ(ix, metric).search(xq, 15, nprobe)
    assert_same_topk(d1.numpy(), i1.numpy(), d2.numpy(), i2.numpy())
    recon = layer.decode(*layer.encode(x))  # brute force over the reconstructions, all lists probed
    q = torch.nn.functional.normalize(xq, dim=1) if metric == "cosine" else xq
    brute = -torch.cdist(q, recon).pow(2) if metric == "l2" else q @ recon.T
    top = brute.topk(15, dim=1)
    shown = top.values.abs() if metric == "l2" else top.values
    assert_same_topk(shown.numpy(), ids[top.indices].numpy(), d2.numpy(), i2.numpy())


@pytest.mark.parametrize("k", [16, 256])
def test_faiss_stores_the_layers_codes_bit_for_bit(k: int) -> None:
    layer, x = rq_layer(8, k)
    index = to_faiss(layer, x, metric="ip")
    coarse_codes, codes = layer.encode(x)
    expected = pack_sa_codes(None, codes.numpy(), 0, k.bit_length() - 1)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.code_size == D * (k.bit_length() - 1) // 8  # no norm stored: equal bytes to IVF-PQ
    for lst in range(ivf.nlist):
        list_ids, list_codes = get_invlist(ivf.invlists, lst)
        assert (coarse_codes.numpy()[list_ids] == lst).all()
        assert np.array_equal(list_codes, expected[list_ids])
    sa = pack_sa_codes(coarse_codes.numpy(), codes.numpy(), ivf.coarse_code_size(), k.bit_length() - 1)
    np.testing.assert_allclose(ivf.sa_decode(sa), layer.decode(coarse_codes, codes).numpy(), atol=1e-5)


def test_settings_it_cannot_take_are_clear_errors() -> None:
    with pytest.raises(PoeemError, match="rotation"):
        PoeemLayer(dim=DIM, num_subspaces=D, quantizer="rq", rotation="opq")
    with pytest.raises(PoeemError, match="'pq' or 'rq'"):
        PoeemLayer(dim=DIM, num_subspaces=D, quantizer="aq")
    PoeemLayer(dim=10, num_subspaces=4, quantizer="rq")  # stages need not divide dim
    layer, x = rq_layer(0)
    with pytest.raises(PoeemError, match="product-quantization"):
        build_faiss_index(learned_index(layer, x), "ip", fast_scan=True)


def test_distillation_starts_from_a_faiss_residual_quantizer_file(tmp_path: Path) -> None:
    items, queries = clustered(1500, 0).numpy(), clustered(300, 1).numpy()
    index = faiss.index_factory(DIM, f"IVF8,RQ{D}x4", faiss.METRIC_INNER_PRODUCT)
    index.train(items)
    index.add(items)
    faiss.write_index(index, str(tmp_path / "rq.faiss"))
    found = read_faiss_quantizer(tmp_path / "rq.faiss")
    assert found.settings["quantizer"] == "rq" and found.codebooks.shape == (D, 16, DIM)
    layer, metric = layer_from_faiss(tmp_path / "rq.faiss", DIM, None)
    assert metric == "ip" and layer.config.num_coarse == 8
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.rq.max_beam_size = 1  # the layer codes greedily
    cc, codes = layer.encode(torch.from_numpy(items))
    packed = pack_sa_codes(cc.numpy(), codes.numpy(), ivf.coarse_code_size(), 4)
    assert np.array_equal(packed, index.sa_encode(items))  # the file's quantizer, exactly

    distill_from_faiss_file(tmp_path, items, queries, tmp_path / "rq.faiss", epochs=2)
    _, found_ids = Searcher.load(tmp_path / "ix").search(queries[:5], 10, nprobe=8)
    assert np.asarray(found_ids).shape == (5, 10) and (np.asarray(found_ids) >= 0).all()

    rotated = faiss.index_factory(DIM, f"OPQ{D},RQ{D}x4", faiss.METRIC_INNER_PRODUCT)
    rotated.train(items)
    faiss.write_index(rotated, str(tmp_path / "opq_rq.faiss"))
    with pytest.raises(PoeemError, match="without a rotation"):
        read_faiss_quantizer(tmp_path / "opq_rq.faiss")


def test_distillation_trains_its_codewords_and_exports_to_faiss(tmp_path: Path) -> None:
    x, queries = clustered(1500, 0), clustered(600, 1)
    layer = PoeemLayer(
        dim=DIM, num_subspaces=D, codebook_size=16, num_coarse=8, quantizer="rq", warmup_steps=0
    )
    layer.initialize(x)
    before = layer.codebooks.detach().clone()
    config = DistillConfig(rounds=1, epochs=5, teacher_k=30, batch_size=64, codebook_lr=3e-3, holdout=0.0)
    result = distill_index(layer, x, queries, config, progress=False)
    assert not torch.equal(layer.codebooks.detach(), before)
    assert result.history[-1]["code_loss"] < result.history[0]["code_loss"]
    searcher = Searcher.create(tmp_path / "ix", layer, (result.coarse_codes, result.codes), metric="ip")
    queries = queries[:20]
    d, i = searcher.search(queries, 10, nprobe=3)
    ours = TorchIVFPQ(learned_index(layer, (result.coarse_codes, result.codes)), "ip")
    d2, i2 = ours.search(queries, 10, 3)
    assert_same_topk(d, i, d2.numpy(), i2.numpy())


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_each_residual_stage_steps_by_its_own_scale(quantizer: str) -> None:
    x, queries = clustered(1500, 0), clustered(100, 1)
    layer = PoeemLayer(
        dim=DIM, num_subspaces=D, codebook_size=16, num_coarse=0, quantizer=quantizer, warmup_steps=0
    )
    layer.initialize(x)
    before = layer.codebooks.detach().clone()
    rms = before.pow(2).mean(dim=(1, 2)).sqrt()
    if quantizer == "rq":
        assert (rms[1:] < rms[:-1]).all()  # later stages code smaller residuals
    config = DistillConfig(rounds=1, epochs=1, teacher_k=30, batch_size=100, codebook_lr=1e-3, holdout=0.0)
    distill_index(layer, x, queries, config, progress=False)  # one Adam step: each entry moves by lr
    step = (layer.codebooks.detach() - before).abs().amax(dim=(1, 2))
    expected = 1e-3 * (rms / rms[0] if quantizer == "rq" else torch.ones(D))
    torch.testing.assert_close(step, expected, rtol=1e-3, atol=1e-7)


def test_train_export_search_and_add_through_the_cli(tmp_path: Path) -> None:
    run, index = tmp_path / "run", tmp_path / "ix"
    args = ["train", "--run-dir", run, "--data", "synthetic", "--num-pairs", "3000", "--poeem"]
    args += ["--quantizer", "rq", "--num-coarse", "4", "--num-subspaces", "4", "--codebook-size", "16"]
    args += ["--warmup-steps", "5", "--buffer-size", "256", "--dim", "16", "--epochs", "1"]
    args += ["--batch-size", "128", "--logger", "none", "--no-progress"]
    runner = CliRunner()
    for command in (args, ["export", run, "--out", index]):
        result = runner.invoke(app, [str(a) for a in command])
        assert result.exit_code == 0, (result.output, result.exception)
    searcher = Searcher.load(index)
    assert searcher.tensors.codebooks.shape == (4, 16, 16)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(searcher._engine.base.index))
    assert isinstance(ivf, faiss.IndexIVFResidualQuantizer)
    n = searcher.ntotal
    searcher.add(torch.randn(3, 16), np.array([10**9, 10**9 + 1, 10**9 + 2]))
    reloaded = Searcher.load(index)
    assert reloaded.ntotal == n + 3
    _, ids = reloaded.search(torch.randn(5, 16), n + 3, nprobe=4)  # every item, in every answer
    assert np.isin([10**9, 10**9 + 1, 10**9 + 2], ids).all()
