import gc
import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import DIM, D, assert_same_topk, correlated, make_dir, trained_layer
from faiss.contrib.inspect_tools import get_invlist

from poeem import PoeemError, PoeemLayer, Searcher
from poeem.export import learned_index, to_faiss
from poeem.export.faiss_codec import pack_sa_codes
from poeem.index.tensors import IndexTensors
from poeem.metric import prepare_queries
from poeem.search import FaissSearcher, FlatIndex, TorchIVFPQ

CASES = [
    (rot, nc, metric) for rot in ("none", "givens") for nc in (0, 8) for metric in ("ip", "cosine", "l2")
]


@pytest.mark.parametrize(("rotation", "num_coarse", "metric"), CASES)
def test_faiss_export_equals_torch_adc(rotation: str, num_coarse: int, metric: str) -> None:
    layer, x = trained_layer(rotation, num_coarse, coarse_metric="l2" if metric == "l2" else "ip")
    if metric == "cosine":  # export codes unit vectors for cosine; code the same ones here
        x = torch.nn.functional.normalize(x, dim=1)
    ids = torch.arange(len(x)) * 3 + 1_000_000_007  # 64-bit user ids
    index = to_faiss(layer, x, ids, metric)
    gc.collect()  # the sub-objects must stay alive with the index
    ours = TorchIVFPQ(learned_index(layer, x, ids), metric)
    xq = torch.randn(40, DIM) * 3
    nprobe = 3 if num_coarse else 1
    d1, i1 = FaissSearcher(index).search(xq, 20, nprobe)
    d2, i2 = ours.search(xq, 20, nprobe)
    assert_same_topk(d1.numpy(), i1.numpy(), d2.numpy(), i2.numpy())
    assert set(i1.flatten().tolist()) <= set(ids.tolist())


@pytest.mark.parametrize("num_coarse", [0, 8])
@pytest.mark.parametrize("k", [16, 256])
def test_faiss_stores_the_layers_codes_bit_for_bit(num_coarse: int, k: int) -> None:
    layer, x = trained_layer("opq", num_coarse, k)
    index = to_faiss(layer, x, metric="ip")
    coarse_codes, codes = layer.encode(x)
    nbits = k.bit_length() - 1
    expected = pack_sa_codes(None, codes.numpy(), 0, nbits)
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexPreTransform) else index
    if num_coarse:
        ivf = faiss.extract_index_ivf(index)
        for lst in range(ivf.nlist):
            list_ids, list_codes = get_invlist(ivf.invlists, lst)
            assert (coarse_codes.numpy()[list_ids] == lst).all()
            assert np.array_equal(list_codes, expected[list_ids])
        assert sum(ivf.invlists.list_size(i) for i in range(ivf.nlist)) == len(x)
    else:
        pq = faiss.downcast_index(faiss.downcast_index(inner).index)
        stored = faiss.vector_to_array(pq.codes).reshape(len(x), -1)
        assert np.array_equal(stored, expected)
        # and FAISS decodes them to the layer's reconstructions (rotated back)
        recon = pq.sa_decode(stored) @ layer.rotation_matrix.detach().numpy().T
        np.testing.assert_allclose(recon, layer.decode(coarse_codes, codes).numpy(), atol=1e-5)


def test_sa_code_packing_of_4_bit_codes() -> None:
    packed = pack_sa_codes(np.array([258]), np.array([[1, 2, 15, 0]]), coarse_code_size=2, nbits=4)
    assert packed.tolist() == [[2, 1, 0x21, 0x0F]]  # list 258 little-endian, then low nibble first


def test_exact_equals_brute_force_scores() -> None:
    xb, xq = torch.randn(300, 8), torch.randn(5, 8)
    d, _ = FlatIndex(xb, "l2").search(xq, 4)
    brute = torch.cdist(xq, xb).pow(2)
    torch.testing.assert_close(d, brute.topk(4, largest=False).values, atol=1e-4, rtol=1e-4)


def test_fast_scan_is_close_to_exact_adc() -> None:
    layer, x = trained_layer("none", 8, k=16)
    index = to_faiss(layer, x, metric="ip", fast_scan=True)
    assert isinstance(faiss.downcast_index(index), faiss.IndexIVFPQFastScan)
    xq = torch.randn(50, DIM)
    _, i1 = FaissSearcher(index).search(xq, 10, 8)
    _, i2 = TorchIVFPQ(learned_index(layer, x), "ip").search(xq, 10, 8)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i1.numpy(), i2.numpy(), strict=True)])
    assert overlap > 0.9


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize(("rotation", "num_coarse"), [("givens", 8), ("none", 8), ("givens", 0)])
def test_torch_scores_a_fast_scan_index_as_faiss_does(metric: str, rotation: str, num_coarse: int) -> None:
    """FAISS rounds each query's look-up tables to 8 bits; the torch backend rounds them the same
    way, so both return the same scores (to float rounding), and the same ids above ties."""
    layer, x = trained_layer(rotation, num_coarse, coarse_metric="l2" if metric == "l2" else "ip")
    items = torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x
    faiss_index = FaissSearcher(to_faiss(layer, items, metric=metric, fast_scan=True))
    torch_index = TorchIVFPQ(
        learned_index(layer, prepare_queries(items, metric, DIM)), metric, fast_scan=True
    )
    xq = correlated(100, DIM, seed=5)
    for nprobe in (1, 3) if num_coarse else (1,):
        d1, i1 = faiss_index.search(xq, 20, nprobe)
        d2, i2 = torch_index.search(xq, 20, nprobe)
        assert_same_topk(d1.numpy(), i1.numpy(), d2.numpy(), i2.numpy())
        exact = TorchIVFPQ(learned_index(layer, prepare_queries(items, metric, DIM)), metric).search(
            xq, 20, nprobe
        )
        assert not torch.allclose(exact[0], d2, atol=1e-3)  # the 8-bit rounding is there


def test_torch_fast_scan_needs_4_bit_pq() -> None:
    layer, x = trained_layer("none", 8, k=256)
    with pytest.raises(PoeemError, match="fast_scan: expected PQ codes with K = 16"):
        TorchIVFPQ(learned_index(layer, x), "ip", fast_scan=True)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_fast_scan_search_ignores_what_the_output_buffer_held(metric: str) -> None:
    """faiss 1.15's fast-scan heap takes the caller's first output distance as a threshold: a
    buffer that starts with the worst-possible value of the other sign keeps nothing."""
    layer, x = trained_layer("none", 8, k=16, coarse_metric="l2" if metric == "l2" else "ip")
    index = to_faiss(layer, x, metric=metric, fast_scan=True)
    xq = torch.randn(6, DIM)
    poison = np.finfo(np.float32).max if metric == "ip" else np.finfo(np.float32).min
    d, i = np.full((6, 3), poison, np.float32), np.full((6, 3), 7, np.int64)
    index.search(xq.numpy(), 3, D=d, I=i)
    assert (i == -1).all()  # the trigger, in FAISS itself
    _, ids = FaissSearcher(index).search(xq, 3, 8)
    assert (ids >= 0).all()


@pytest.mark.parametrize("k", [16, 256])
def test_index_dir_serves_4_bit_pq_as_fast_scan_by_default(tmp_path: Path, k: int) -> None:
    layer, x = trained_layer("none", 8, k=k)
    searcher = Searcher.create(tmp_path / "ix", layer, x, ids=np.arange(len(x)))
    assert searcher.manifest.fast_scan == (k == 16)
    inner = faiss.downcast_index(faiss.read_index(str(tmp_path / "ix" / "index-1.faiss")))
    assert isinstance(inner, faiss.IndexIVFPQFastScan if k == 16 else faiss.IndexIVFPQ)
    xq = torch.randn(50, DIM)
    _, found = searcher.search(xq, 10, nprobe=8)
    _, exact_adc = TorchIVFPQ(learned_index(layer, x, torch.arange(len(x))), "ip").search(xq, 10, 8)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact_adc.numpy(), strict=True)])
    assert overlap > (0.9 if k == 16 else 0.999)


def test_fast_scan_needs_4_bits() -> None:
    layer, x = trained_layer("none", 8, k=256)
    with pytest.raises(PoeemError, match="fast_scan: expected K = 16"):
        to_faiss(layer, x, fast_scan=True)


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_index_dir_round_trip(tmp_path: Path, backend: str) -> None:
    searcher, layer, x = make_dir(tmp_path, backend)
    xq = torch.randn(7, DIM)
    d, i = searcher.search(xq, 5, nprobe=2)
    d2, i2 = TorchIVFPQ(learned_index(layer, x[:1000], torch.arange(1000) + 10), "cosine").search(xq, 5, 2)
    assert_same_topk(d, i, d2.numpy(), i2.numpy())
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    assert manifest["metric"] == "cosine" and manifest["faiss_version"] == faiss.__version__


def test_add_and_remove(tmp_path: Path) -> None:
    searcher, layer, x = make_dir(tmp_path)
    new = x[1000:1100]
    searcher.add(new, np.arange(5000, 5100))
    assert searcher.ntotal == 1100
    # adding with the frozen codebooks equals exporting all items at once
    reloaded = Searcher.load(tmp_path / "ix")
    all_ids = torch.cat([torch.arange(1000) + 10, torch.arange(5000, 5100)])
    together = TorchIVFPQ(learned_index(layer, x[:1100], all_ids), "cosine")
    xq = torch.randn(30, DIM)
    d, i = reloaded.search(xq, 50, nprobe=3)
    d2, i2 = together.search(xq, 50, 3)
    assert_same_topk(d, i, d2.numpy(), i2.numpy())
    assert np.isin(np.arange(5000, 5100), reloaded.search(xq, 1100, nprobe=8)[1]).all()
    assert reloaded.remove(np.array([5000, 10])) == 2
    reloaded = Searcher.load(tmp_path / "ix")
    assert reloaded.ntotal == 1098
    _, i = reloaded.search(torch.randn(20, DIM), 1098, nprobe=8)
    assert 5000 not in i and 10 not in i and 5001 in i
    # updates write what they change: a segment of the added items, then the removed ids
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [
        ".lock",
        "codes-1.safetensors",
        "index-1.faiss",
        "manifest.json",
        "segment-2.safetensors",
        "tombstones-3.safetensors",
    ]
    reloaded.compact()
    compacted = Searcher.load(tmp_path / "ix")
    assert compacted.version == 4 and compacted.ntotal == 1098
    assert sorted(compacted.manifest.files) == ["codes", "faiss"]
    torch.testing.assert_close(compacted.tensors.codes, reloaded.tensors.codes)


def test_duplicate_or_unknown_ids(tmp_path: Path) -> None:
    searcher, _, x = make_dir(tmp_path)
    with pytest.raises(
        PoeemError, match=r"expected ids not already in the index, got 1 existing ids, e.g. \[10\]"
    ):
        searcher.add(x[:2], np.array([10, 99999]))
    with pytest.raises(PoeemError, match="unique ids"):
        searcher.add(x[:2], np.array([7, 7]))
    with pytest.raises(PoeemError, match=r"unknown ids \[123456\]"):
        searcher.remove(np.array([123456]))
    assert Searcher.load(tmp_path / "ix").ntotal == 1000


def test_query_dim_k_and_nprobe_checks(tmp_path: Path) -> None:
    searcher, _, _ = make_dir(tmp_path)
    with pytest.raises(PoeemError, match=r"queries: expected shape \(n, 16\), got shape \(2, 8\)"):
        searcher.search(torch.randn(2, 8), 5)
    with pytest.warns(UserWarning, match="k=5000 is larger than the 1000 items"):
        _, i = searcher.search(torch.randn(2, DIM), 5000, nprobe=8)
    assert i.shape == (2, 1000)
    with pytest.warns(UserWarning, match="nprobe=99 is larger than the 8 lists"):
        searcher.search(torch.randn(2, DIM), 5, nprobe=99)


def test_corrupt_or_missing_files_are_clear_and_keep_the_old_index(tmp_path: Path) -> None:
    make_dir(tmp_path)
    with pytest.raises(PoeemError, match=r"'.*nothing', which does not exist"):
        Searcher.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PoeemError, match=r"no manifest\.json"):
        Searcher.load(tmp_path / "empty")
    faiss_file = tmp_path / "ix" / "index-1.faiss"
    original = faiss_file.read_bytes()
    faiss_file.write_bytes(original[:-10] + b"corruption")
    with pytest.raises(PoeemError, match=r"index file checksum.*corrupt or was changed"):
        Searcher.load(tmp_path / "ix")
    faiss_file.write_bytes(original)
    assert Searcher.load(tmp_path / "ix").ntotal == 1000


def test_create_refuses_to_overwrite(tmp_path: Path) -> None:
    _, layer, x = make_dir(tmp_path)
    with pytest.raises(PoeemError, match="holds an index"):
        Searcher.create(tmp_path / "ix", layer, x)


def test_interrupted_update_leaves_previous_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    searcher, _, x = make_dir(tmp_path)
    import poeem.export.index_dir as index_dir

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(index_dir, "atomic_write_json", fail)  # dies before the manifest switches
    with pytest.raises(OSError, match="disk full"):
        searcher.add(x[1000:1010], np.arange(9000, 9010))
    monkeypatch.undo()
    assert Searcher.load(tmp_path / "ix").ntotal == 1000


def test_export_before_training_is_clear() -> None:
    layer = PoeemLayer(dim=DIM, num_subspaces=D, codebook_size=16, num_coarse=0, buffer_size=16)
    with pytest.raises(PoeemError, match="expected a trained, initialized PoeemLayer"):
        to_faiss(layer, torch.randn(4, DIM))


def test_export_warns_when_list_rules_differ() -> None:
    layer, x = trained_layer("none", 8, coarse_metric="l2")
    with pytest.warns(
        UserWarning, match="assigns items to lists by 'l2' but a 'ip' index probes lists by 'ip'"
    ):
        to_faiss(layer, x, metric="ip")


def test_index_tensors_keep_codes_compact_and_check_them_first() -> None:
    g = torch.Generator().manual_seed(0)
    n = 500

    def tensors(coarse_codes: torch.Tensor, codes: torch.Tensor, nlist: int = 1024) -> IndexTensors:
        return IndexTensors(
            rotation=torch.eye(8),
            coarse=torch.randn(nlist, 8, generator=g),
            codebooks=torch.randn(2, 256, 4, generator=g),
            coarse_codes=coarse_codes,
            codes=codes,
            ids=torch.arange(n),
        ).validate()

    lists, codes = torch.randint(1024, (n,), generator=g), torch.randint(256, (n, 2), generator=g)
    ix = tensors(lists, codes)  # int64 in, 1 byte per sub-code and 2 per list kept
    assert ix.codes.dtype == torch.uint8 and ix.coarse_codes.dtype == torch.int16
    assert torch.equal(ix.codes.long(), codes) and torch.equal(ix.coarse_codes.long(), lists)
    assert tensors(lists.to(torch.uint16), codes).coarse_codes.dtype == torch.int16  # encode()'s dtype
    assert tensors(torch.randint(40_000, (n,), generator=g), codes, 40_000).coarse_codes.dtype == torch.int32
    # the range is checked before the cast, which would wrap 256 to 0
    with pytest.raises(PoeemError, match=r"got range \[\d+, 256\]"):
        tensors(lists, torch.where(codes == 0, 256, codes))
    with pytest.raises(PoeemError, match="integer codes"):
        tensors(lists, codes.float())


@pytest.mark.parametrize("spec", ["IVF4,PQ2x8", "OPQ2,PQ2x8"])
def test_the_faiss_baseline_skips_polysemous_training_and_searches_the_same(spec: str) -> None:
    """index_factory turns on polysemous training for 8-bit PQ (about a second per subquantizer,
    whatever the data size): it only permutes codewords, so the baseline skips it and finds the
    same neighbours at the same scores as an index trained with it."""
    from poeem.search.faiss_backend import untrained_faiss_index

    x = correlated(2000, 8, seed=2).numpy()
    lean = untrained_faiss_index(8, spec, "ip", seed=3)
    full = untrained_faiss_index(8, spec, "ip", seed=3)
    pq_owner = faiss.downcast_index(
        faiss.extract_index_ivf(full) if spec.startswith("IVF") else faiss.downcast_index(full).index
    )
    assert not pq_owner.do_polysemous_training
    pq_owner.do_polysemous_training = True
    for index in (lean, full):
        index.train(x)
        index.add(x)
    d_lean, i_lean = lean.search(x[:50], 10)
    d_full, i_full = full.search(x[:50], 10)
    np.testing.assert_allclose(d_lean, d_full, rtol=1e-5, atol=1e-5)
    assert (i_lean == i_full).mean() > 0.98  # ties may swap places


@pytest.mark.parametrize(("rotation", "metric"), [("givens", "ip"), ("none", "cosine"), ("opq", "l2")])
def test_float_lists_route_like_the_learned_index_and_score_exactly(rotation: str, metric: str) -> None:
    """``poeem evaluate --lists-ceiling``: each item in its learned list as a float vector; a
    query probes the lists the learned index routes it to and gets the exact top 10 of their
    items; all lists probed is exact search."""
    from poeem.export.faiss_codec import build_float_lists_index

    layer, x = trained_layer(rotation, num_coarse=8, coarse_metric="l2" if metric == "l2" else "ip")
    ix = learned_index(layer, x)
    flat = FaissSearcher(build_float_lists_index(ix, x, metric))
    xq = correlated(40, DIM, seed=5)
    _, everywhere = flat.search(xq, 10, nprobe=8)
    assert torch.equal(everywhere, FlatIndex(x, metric).search(xq, 10)[1])
    qr = torch.nn.functional.normalize(xq, dim=1) if metric == "cosine" else xq
    qr = qr @ ix.rotation
    routed = (-torch.cdist(qr, ix.coarse) if metric == "l2" else qr @ ix.coarse.T).argmax(1)
    _, one_list = flat.search(xq, 10, nprobe=1)
    for q, lst in enumerate(routed.tolist()):
        members = torch.nonzero(ix.coarse_codes == lst).flatten()
        _, top = FlatIndex(x[members], metric).search(xq[q : q + 1], 10)
        expected = members[top[0][top[0] >= 0]]
        assert one_list[q][: len(expected)].tolist() == expected.tolist()
    with pytest.raises(PoeemError, match="one row per indexed item"):
        build_float_lists_index(ix, x[:-1], metric)
    flat_layer, _ = trained_layer("none", num_coarse=0)
    with pytest.raises(PoeemError, match="a learned index with IVF lists"):
        build_float_lists_index(learned_index(flat_layer, x), x, metric)
