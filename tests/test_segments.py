"""Updates as segments and tombstones: an update writes what it adds, and searching
base + segments - tombstones returns what a fully rebuilt index returns."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIM, assert_same_topk, correlated, trained_layer
from typer.testing import CliRunner

import poeem.search.segments as segments
from poeem import Searcher
from poeem.cli import app
from poeem.errors import PoeemError
from poeem.export.faiss_codec import build_faiss_index
from poeem.search import FaissSearcher, TorchIVFPQ


def rebuilt_search(
    searcher: Searcher, xq: torch.Tensor, k: int, nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    """What a FAISS index built from scratch over the live items answers (raw ids)."""
    live = searcher.tensors
    engine = FaissSearcher(build_faiss_index(live, searcher.metric, searcher.manifest.fast_scan))
    d, i = engine.search(xq, k, nprobe)
    ids = i.numpy()
    return d.numpy(), searcher.item_keys.raw(ids) if searcher.item_keys is not None else ids


CASES = [  # (rotation, num_coarse, K, metric, fast_scan, string ids, quantizer)
    ("givens", 8, 16, "ip", False, False, "pq"),
    ("none", 8, 16, "l2", False, False, "pq"),
    ("none", 8, 16, "ip", True, False, "pq"),
    ("givens", 8, 16, "l2", True, True, "pq"),
    ("none", 0, 16, "cosine", True, False, "pq"),
    ("givens", 0, 16, "cosine", False, True, "pq"),
    ("none", 8, 16, "ip", False, False, "rq"),  # FAISS takes no id selector for an IVF-RQ
    ("none", 8, 16, "l2", False, True, "rq"),
    ("none", 0, 16, "ip", False, False, "rq"),
]


@pytest.mark.parametrize(
    ("rotation", "num_coarse", "k", "metric", "fast_scan", "strings", "quantizer"), CASES
)
def test_segments_and_tombstones_search_like_a_rebuilt_index(
    tmp_path: Path,
    rotation: str,
    num_coarse: int,
    k: int,
    metric: str,
    fast_scan: bool,
    strings: bool,
    quantizer: str,
) -> None:
    coarse_metric = "l2" if metric == "l2" else "ip"
    layer, x = trained_layer(rotation, num_coarse, k=k, coarse_metric=coarse_metric, quantizer=quantizer)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    names = np.array([f"item-{i}" for i in range(1500)]) if strings else np.arange(1500) + 7
    Searcher.create(tmp_path / "ix", layer, x[:1000], ids=names[:1000], metric=metric, fast_scan=fast_scan)
    rng = np.random.default_rng(0)
    xq = correlated(40, DIM, seed=5)
    for step, (start, stop) in enumerate([(1000, 1100), (1100, 1101), (1101, 1300)]):
        writer = Searcher.load(tmp_path / "ix")
        writer.add(x[start:stop], names[start:stop])
        live_ids = writer.item_keys.raw(writer.tensors.ids.numpy()) if strings else writer.tensors.ids.numpy()
        writer.remove(rng.choice(live_ids, 30 + step, replace=False))
        for backend in ("faiss", "torch"):
            searcher = Searcher.load(tmp_path / "ix", backend=backend)
            assert len(searcher.index.segments) == step + 1 and searcher.index.removed.numel() > 0
            d, i = searcher.search(xq, 20, nprobe=3)
            d2, i2 = rebuilt_search(searcher, xq, 20, 3)
            assert_same_topk(d, i, d2, i2)  # torch scores as FAISS does, fast scan included
    assert searcher.ntotal == 1000 + 300 - (30 + 31 + 32)


def test_adding_one_item_writes_one_small_segment(tmp_path: Path) -> None:
    layer, x = trained_layer("givens", 8)
    Searcher.create(tmp_path / "ix", layer, x[:1400], metric="ip")
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ix").iterdir()}
    searcher = Searcher.load(tmp_path / "ix")
    searcher.add(x[1400:1401], [50_000])
    written = {
        p.name: p.stat().st_size
        for p in (tmp_path / "ix").iterdir()
        if before.get(p.name) != p.stat().st_mtime_ns
    }
    assert set(written) == {"manifest.json", "segment-2.safetensors"}
    assert written["segment-2.safetensors"] < 1000 and sum(written.values()) < 10_000
    d, i = searcher.search(x[1390:1401], 5, nprobe=8)
    assert_same_topk(d, i, *rebuilt_search(searcher, x[1390:1401], 5, 8))
    assert 50_000 in searcher.search(x[1400:1401], 1401, nprobe=8)[1]


@pytest.mark.parametrize("quantizer", ["pq", "rq"])
def test_a_removed_id_can_come_back(tmp_path: Path, quantizer: str) -> None:
    layer, x = trained_layer("none", 8, quantizer=quantizer)
    Searcher.create(tmp_path / "ix", layer, x[:1000], metric="ip")
    searcher = Searcher.load(tmp_path / "ix")
    searcher.remove([5])
    searcher.add(x[1000:1001], [5])  # a new embedding under the old id: folded into a new base
    assert "tombstones" not in searcher.manifest.files and searcher.ntotal == 1000
    reloaded = Searcher.load(tmp_path / "ix")
    assert torch.equal(reloaded.tensors.ids, searcher.tensors.ids)
    assert 5 in reloaded.search(x[1000:1001], 1000, nprobe=8)[1]
    d, i = reloaded.search(x[:20], 10, nprobe=2)
    assert_same_topk(d, i, *rebuilt_search(reloaded, x[:20], 10, 2))


@pytest.mark.parametrize("quantizer", ["pq", "rq"])
def test_updates_compact_past_the_threshold(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quantizer: str
) -> None:
    monkeypatch.setattr(segments, "COMPACT_MIN_ROWS", 50)
    layer, x = trained_layer("none", 8, quantizer=quantizer)
    Searcher.create(tmp_path / "ix", layer, x[:300], metric="ip")
    searcher = Searcher.load(tmp_path / "ix")
    searcher.add(x[300:320], np.arange(2000, 2020))
    assert len(searcher.index.segments) == 1
    searcher.add(x[320:360], np.arange(3000, 3040))  # 60 segment rows >= max(50, 10% of 300)
    assert searcher.index.segments == () and sorted(searcher.manifest.files) == ["codes", "faiss"]
    assert searcher.ntotal == 360 and Searcher.load(tmp_path / "ix").ntotal == 360


def test_many_segments_merge_into_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "MAX_SEGMENTS", 3)
    layer, x = trained_layer("givens", 8)
    Searcher.create(tmp_path / "ix", layer, x[:500], metric="ip")
    searcher = Searcher.load(tmp_path / "ix")
    for i in range(4):
        searcher.add(x[500 + i : 501 + i], [800 + i])
    searcher.remove([801])
    reloaded = Searcher.load(tmp_path / "ix")
    assert len(reloaded.index.segments) == 2 and reloaded.ntotal == 503  # 3 merged, then 1
    assert sorted(reloaded.manifest.files) == ["codes", "faiss", "segment:4", "segment:5", "tombstones"]
    xq = x[490:504]
    assert_same_topk(*reloaded.search(xq, 10, nprobe=3), *rebuilt_search(reloaded, xq, 10, 3))


@pytest.mark.parametrize("quantizer", ["pq", "rq"])
def test_poeem_compact(tmp_path: Path, quantizer: str) -> None:
    layer, x = trained_layer("none", 8, quantizer=quantizer)
    Searcher.create(tmp_path / "ix", layer, x[:500], metric="ip")
    searcher = Searcher.load(tmp_path / "ix")
    searcher.add(x[500:510], np.arange(900, 910))
    searcher.remove([0, 1, 2])
    xq = torch.randn(10, DIM)
    before = searcher.search(xq, 10, nprobe=8)
    result = CliRunner().invoke(app, ["compact", str(tmp_path / "ix")])
    assert result.exit_code == 0, result.output
    assert "merged 1 segments and 3 removed ids: 507 items (version 4)" in result.output
    after = Searcher.load(tmp_path / "ix").search(xq, 10, nprobe=8)
    assert_same_topk(*before, *after)
    assert sorted(p.name for p in (tmp_path / "ix").iterdir() if p.name != ".lock") == [
        "codes-1.safetensors",  # version 3's files stay for readers that just read its manifest
        "codes-4.safetensors",
        "index-1.faiss",
        "index-4.faiss",
        "manifest.json",
        "segment-2.safetensors",
        "tombstones-3.safetensors",
    ]


def test_a_fork_updates_without_touching_the_served_searcher(tmp_path: Path) -> None:
    layer, x = trained_layer("none", 8)
    Searcher.create(tmp_path / "ix", layer, x[:500], metric="ip", fast_scan=False)  # exact ADC scores
    served = Searcher.load(tmp_path / "ix")
    xq = torch.randn(5, DIM)
    before = served.search(xq, 5, nprobe=8)
    fork = served.fork()
    fork.add(x[500:520], np.arange(700, 720))
    fork.remove([3])
    assert served.version == 1 and served.ntotal == 500 and fork.ntotal == 519
    np.testing.assert_array_equal(served.search(xq, 5, nprobe=8)[1], before[1])
    assert (
        TorchIVFPQ(fork.tensors, "ip").search(xq, 5, 8)[1].tolist()
        == fork.search(xq, 5, nprobe=8)[1].tolist()
    )


def test_an_update_answers_from_the_version_it_published(tmp_path: Path) -> None:
    """Regression: POST /items read `version` from its update and `items` from whatever the
    server held a moment later (possibly another writer's newer version)."""
    from poeem.serve.service import IndexService

    layer, x = trained_layer("none", 8)
    Searcher.create(tmp_path / "ix", layer, x[:300], metric="ip")
    service = IndexService(tmp_path / "ix")
    first = service.add([x[300].tolist()], [None], np.array([9000]))
    second = service.add([x[301].tolist(), x[302].tolist()], [None, None], np.array([9001, 9002]))
    assert (first.version, first.ntotal) == (2, 301) and (second.version, second.ntotal) == (3, 303)
    assert service.searcher is second


def test_a_version_that_cannot_be_searched_is_never_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An IVF-RQ base searched with an id selector (which FAISS refuses) must fail the update,
    not every later search: the directory and the searcher keep the version before it."""
    layer, x = trained_layer("none", 8, quantizer="rq")
    Searcher.create(tmp_path / "ix", layer, x[:500], metric="ip")
    searcher = Searcher.load(tmp_path / "ix")
    monkeypatch.setattr(segments, "takes_selector", lambda index, selector: True)
    with pytest.raises(PoeemError, match="an index that can be searched"):
        searcher.remove([3])
    assert searcher.version == 1 and searcher.ntotal == 500
    assert Searcher.load(tmp_path / "ix").version == 1
    assert 3 in searcher.search(x[3:4], 500, nprobe=8)[1]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("fast_scan", [True, False])
@pytest.mark.parametrize(("metric", "num_coarse"), [("ip", 8), ("cosine", 8), ("l2", 8), ("l2", 0)])
def test_an_item_and_its_copy_in_a_segment_score_alike(
    tmp_path: Path, backend: str, fast_scan: bool, metric: str, num_coarse: int
) -> None:
    """The base (read from disk) and a segment (built in memory) search with one set of FAISS
    settings, so identical codes score identically wherever they are stored."""
    layer, x = trained_layer("none", num_coarse, coarse_metric="l2" if metric == "l2" else "ip")
    Searcher.create(tmp_path / "ix", layer, x[:1000], metric=metric, fast_scan=fast_scan)
    Searcher.load(tmp_path / "ix").add(x[:60], np.arange(5000, 5060))  # copies of items 0..59
    searcher = Searcher.load(tmp_path / "ix", backend=backend)
    base, segment = searcher.index.base, searcher.index.segments[0]
    assert torch.equal(segment.codes, base.codes[:60]) and torch.equal(
        segment.coarse_codes, base.coarse_codes[:60]
    )
    d, i = searcher.search(correlated(20, DIM, seed=5), 1060, nprobe=min(3, searcher.nlist))
    pairs = 0
    for row_d, row_i in zip(d, i, strict=True):
        score = dict(zip(row_i.tolist(), row_d.tolist(), strict=True))
        for item in range(60):
            if item in score:
                assert score[item] == score[5000 + item], (item, score[item], score[5000 + item])
                pairs += 1
    assert pairs >= 200


@pytest.mark.parametrize("fast_scan", [True, False])
@pytest.mark.parametrize(("metric", "num_coarse"), [("ip", 8), ("cosine", 0), ("l2", 8), ("l2", 0)])
def test_the_writer_after_compaction_and_a_fresh_reader_answer_alike(
    tmp_path: Path, fast_scan: bool, metric: str, num_coarse: int
) -> None:
    layer, x = trained_layer("givens", num_coarse, coarse_metric="l2" if metric == "l2" else "ip")
    Searcher.create(tmp_path / "ix", layer, x[:1000], metric=metric, fast_scan=fast_scan)
    writer = Searcher.load(tmp_path / "ix")
    writer.add(x[1000:1100], np.arange(1000, 1100))
    writer.remove(np.arange(0, 1000, 7))
    writer.compact()
    reader = Searcher.load(tmp_path / "ix")
    assert reader.version == writer.version and not reader.index.segments
    xq = correlated(30, DIM, seed=5)
    d1, i1 = writer.search(xq, 20, nprobe=min(3, reader.nlist))
    d2, i2 = reader.search(xq, 20, nprobe=min(3, reader.nlist))
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i1, i2)


@pytest.mark.parametrize(
    ("num_coarse", "quantizer", "fast_scan"),
    [(0, "pq", True), (0, "pq", False), (0, "rq", False), (8, "rq", False)],  # no id selector
)
def test_removes_cost_what_they_remove(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, num_coarse: int, quantizer: str, fast_scan: bool
) -> None:
    """A base FAISS filters with no id selector fetches about k / (1 - removed share) results
    per query, not k plus every removed id; only queries left short are searched again."""
    layer, x = trained_layer("none", num_coarse, quantizer=quantizer)
    Searcher.create(tmp_path / "ix", layer, x[:1000], metric="ip", fast_scan=fast_scan)
    searcher = Searcher.load(tmp_path / "ix")
    xq = correlated(30, DIM, seed=5)
    nprobe = min(3, searcher.nlist)
    nearest = searcher.search(xq[:1], 60, nprobe=nprobe)[1][0]
    scattered = np.setdiff1d(np.random.default_rng(0).choice(1000, 300, replace=False), nearest)
    searcher.remove(np.concatenate([scattered, nearest]))  # query 0 loses its 60 nearest
    widths: list[tuple[int, int]] = []
    search = FaissSearcher.search

    def spy(
        self: FaissSearcher, q: torch.Tensor, k: int, nprobe: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        widths.append((q.shape[0], k))
        return search(self, q, k, nprobe)

    monkeypatch.setattr(FaissSearcher, "search", spy)
    d, i = searcher.search(xq, 10, nprobe=nprobe)
    monkeypatch.undo()
    first = widths[0][1]
    assert widths[0][0] == 30 and 10 < first < 50  # 360 removed: not 370 per query
    assert widths[1:] and all(nq < 15 and k > first for nq, k in widths[1:])  # query 0 and some near it
    assert_same_topk(d, i, *rebuilt_search(searcher, xq, 10, nprobe))
    assert not np.isin(i, np.concatenate([scattered, nearest])).any()
