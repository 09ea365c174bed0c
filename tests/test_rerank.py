"""Re-ranking with stored item vectors: the codes' top F k candidates re-scored exactly, the
vectors kept in step with the codes through every update, and indexes without them."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DIM, correlated, tiny_run, trained_layer
from typer.testing import CliRunner

import poeem.search.rerank as rerank
import poeem.search.segments as segments
from poeem import Searcher
from poeem.cli import app
from poeem.errors import PoeemError
from poeem.export.item_vectors import VectorCodec
from poeem.metric import prepare_queries
from poeem.pipeline import export_run
from poeem.pipeline.recipe import IndexRecipe


def exact_among(
    xq: torch.Tensor, candidates: np.ndarray, vectors: dict, k: int, metric: str
) -> tuple[np.ndarray, list[list]]:
    """The exact top-k of each query among its own candidate ids, one query at a time (the
    reference a vectorised re-ranking must equal); ``vectors`` maps an id to its float vector."""
    q = prepare_queries(xq, metric, xq.shape[1]).double()
    scores, ids = [], []
    for row, cand in zip(q, candidates, strict=True):
        cand = [c for c in cand.tolist() if c not in (-1, "")]
        x = torch.stack([vectors[c] for c in cand]).double()
        s = x @ row if metric != "l2" else ((x - row) ** 2).sum(-1)
        order = torch.argsort(s, descending=metric != "l2")[:k]
        scores.append(s[order].float().numpy())
        ids.append([cand[j] for j in order.tolist()])
    return np.stack(scores), ids


@pytest.mark.parametrize("precision", ["float", "fp16", "sq8"])
@pytest.mark.parametrize(("metric", "strings"), [("ip", False), ("cosine", True), ("l2", False)])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_reranked_results_equal_an_exact_search_among_the_candidates(
    tmp_path: Path, precision: str, metric: str, strings: bool, backend: str
) -> None:
    layer, x = trained_layer("givens", 8, coarse_metric="l2" if metric == "l2" else "ip")
    names = np.array([f"doc-{i}" for i in range(1000)]) if strings else np.arange(1000) * 3 + 1
    Searcher.create(tmp_path / "ix", layer, x[:1000], ids=names, metric=metric, rerank=precision)
    searcher = Searcher.load(tmp_path / "ix", backend=backend)
    assert searcher.vector_codec is not None and searcher.vector_codec.precision == precision
    codec = searcher.vector_codec
    kept = codec.decode(codec.encode(prepare_queries(x[:1000], metric, DIM)))  # what the index holds
    vectors = dict(zip(names.tolist(), kept, strict=True))
    xq = correlated(30, DIM, seed=7)
    k, factor = 5, 4
    _, cand = searcher.search(xq, k * factor, nprobe=3, rerank=0)
    d, i = searcher.search(xq, k, nprobe=3, rerank=factor)
    d_ref, i_ref = exact_among(xq, cand, vectors, k, metric)
    assert [row.tolist() for row in i] == i_ref
    np.testing.assert_allclose(d, d_ref, rtol=1e-4, atol=1e-4)
    codes_only = searcher.search(xq, k, nprobe=3, rerank=1)[1]
    assert not np.array_equal(codes_only, i)  # the codes alone rank otherwise
    if precision == "float":
        exact = exact_among(xq, np.tile(names, (30, 1)), vectors, k, metric)[1]
        reached = np.mean([len(set(a) & set(b)) / k for a, b in zip(i.tolist(), exact, strict=True)])
        base = np.mean([len(set(a) & set(b)) / k for a, b in zip(codes_only.tolist(), exact, strict=True)])
        assert reached > base  # re-ranking recovers neighbours the codes ranked too low


def test_the_default_factor_reranks_an_index_with_vectors(tmp_path: Path) -> None:
    layer, x = trained_layer("none", 8)
    searcher = Searcher.create(tmp_path / "ix", layer, x[:1000], rerank="fp16")
    xq = correlated(10, DIM, seed=3)
    default = searcher.search(xq, 5, nprobe=2)
    np.testing.assert_array_equal(
        default[1], searcher.search(xq, 5, nprobe=2, rerank=rerank.DEFAULT_RERANK_FACTOR)[1]
    )
    assert "+ 32 bytes of fp16 vectors" in searcher.describe()


def test_rerank_with_excludes_and_short_lists(tmp_path: Path) -> None:
    layer, x = trained_layer("givens", 8)
    names = np.array([f"doc-{i}" for i in range(1000)])
    searcher = Searcher.create(tmp_path / "ix", layer, x[:1000], ids=names, rerank="float")
    xq = correlated(6, DIM, seed=11)
    top = searcher.search(xq, 10, nprobe=8, rerank=4)[1]
    exclude = [[*row[:3].tolist(), "not-an-item"] for row in top]
    d, i = searcher.search(xq, 10, nprobe=8, rerank=4, exclude=exclude)
    assert not any(set(row) & set(gone) for row, gone in zip(i.tolist(), exclude, strict=True))
    _, cand = searcher.search(xq, 40, nprobe=8, rerank=0, exclude=exclude)
    vectors = dict(zip(names.tolist(), x[:1000], strict=True))
    assert [row.tolist() for row in i] == exact_among(xq, cand, vectors, 10, "ip")[1]
    # more candidates than the probed lists hold: rows run short exactly as without re-ranking
    d, i = searcher.search(xq, 900, nprobe=1, rerank=4)
    short = searcher.search(xq, 900, nprobe=1, rerank=0)[1]
    assert ((i == "") == (short == "")).all() and (i == "").any()
    assert np.isneginf(d[i == ""]).all()


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("precision", ["sq8", "fp16"])
@pytest.mark.parametrize("step", [1, 2])  # consecutive ids (row = id - first) or not (a search)
def test_rescore_is_one_batched_pass_equal_to_per_query_scoring(
    monkeypatch: pytest.MonkeyPatch, metric: str, precision: str, step: int
) -> None:
    """The vectorised re-scoring over many chunks equals scoring each query alone."""
    monkeypatch.setattr(rerank, "GATHER_FLOATS", 50 * DIM * 5)  # chunks of 5 queries
    layer, x = trained_layer("none", 8)
    from poeem.export.learned import learned_index
    from poeem.search.segments import SegmentedIndex

    codec = VectorCodec.fit(precision, x[:1000])
    base = learned_index(layer, x[:1000], torch.arange(1000) * step + 5)
    base.vectors = codec.encode(x[:1000])
    stored = rerank.StoredVectors(SegmentedIndex(base), codec)
    xq = correlated(64, DIM, seed=2)
    rows = torch.randint(0, 1000, (64, 50))
    cand = rows * step + 5
    cand[:, -3:] = -1  # missing candidates sort last
    cand[0, 5:] = -1  # fewer candidates than k: the row runs short
    d, i = rerank.rescore(xq.numpy(), cand.numpy(), stored, 8, metric)
    kept = codec.decode(codec.encode(x[:1000])).double()
    for row in range(64):
        valid = cand[row] >= 0
        x_row, q = kept[rows[row][valid]], xq[row].double()
        s = ((x_row - q) ** 2).sum(-1) if metric == "l2" else x_row @ q
        order = torch.argsort(s, descending=metric != "l2")[:8]
        n = len(order)
        assert i[row, :n].tolist() == cand[row][valid][order].tolist() and (i[row, n:] == -1).all()
        np.testing.assert_allclose(d[row, :n], s[order].numpy(), rtol=1e-4, atol=1e-4)
        assert np.isinf(d[row, n:]).all()


def assert_same_reranked(
    a: Searcher, b: Searcher, xq: torch.Tensor, k: int, factor: int, nprobe: int
) -> None:
    """``a`` and ``b`` re-rank alike: equal results wherever their codes give the same
    candidates, and candidates that differ only among scores tied with the last one kept."""
    d, i = a.search(xq, k, nprobe=nprobe, rerank=factor)
    d2, i2 = b.search(xq, k, nprobe=nprobe, rerank=factor)
    cd, ci = a.search(xq, k * factor, nprobe=nprobe, rerank=0)
    cd2, ci2 = b.search(xq, k * factor, nprobe=nprobe, rerank=0)
    np.testing.assert_allclose(cd, cd2, rtol=1e-5, atol=1e-5)  # the codes score alike
    same = 0
    for row in range(xq.shape[0]):
        if set(ci[row].tolist()) == set(ci2[row].tolist()):
            assert i[row].tolist() == i2[row].tolist()
            np.testing.assert_allclose(d[row], d2[row], rtol=1e-5, atol=1e-5)
            same += 1
        else:  # a tie at the boundary: every differing candidate scores as the last one
            differing = np.isin(ci[row], ci2[row], invert=True)
            np.testing.assert_allclose(cd[row][differing], cd[row][-1], rtol=1e-6)
    assert same >= 0.9 * xq.shape[0]


@pytest.mark.parametrize(("precision", "strings"), [("float", False), ("sq8", True)])
def test_vectors_stay_in_step_through_adds_removes_readds_and_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str, strings: bool
) -> None:
    monkeypatch.setattr(segments, "COMPACT_MIN_ROWS", 150)
    layer, x = trained_layer("givens", 8)
    x = torch.cat([x, correlated(500, DIM, seed=9)])  # 2000 items
    names = np.array([f"item-{i}" for i in range(2000)]) if strings else np.arange(2000) + 7
    # exact ADC scores (fast scan's quantised tables may break ties of the codes otherwise)
    Searcher.create(tmp_path / "ix", layer, x[:1000], ids=names[:1000], rerank=precision, fast_scan=False)
    codec = Searcher.load(tmp_path / "ix").vector_codec
    assert codec is not None
    xq = correlated(25, DIM, seed=5)
    rng = np.random.default_rng(0)
    live = {name: row for row, name in enumerate(names[:1000].tolist())}  # id -> row of x
    removed: list = []
    # (update, what the directory holds after it: segments, tombstones)
    steps = [
        (("add", 1000, 1050), (1, False)),
        (("remove", 30), (1, True)),
        (("add", 1050, 1051), (2, True)),
        (("readd", 3), (0, False)),  # a removed id comes back: folded into a new base
        (("add", 1051, 1100), (1, False)),
        (("remove", 10), (1, True)),
        (("add", 1100, 1260), (0, False)),  # past the compaction threshold
        (("add", 1260, 1270), (1, False)),
        (("remove", 5), (1, True)),
        (("compact",), (0, False)),
    ]
    for number, (step, (num_segments, tombstones)) in enumerate(steps):
        writer = Searcher.load(tmp_path / "ix")
        if step[0] == "add":
            writer.add(x[step[1] : step[2]], names[step[1] : step[2]])
            live.update({names[r]: r for r in range(step[1], step[2])})
        elif step[0] == "remove":
            removed = rng.choice(sorted(live), step[1], replace=False).tolist()
            writer.remove(removed)
            for gone in removed:
                del live[gone]
        elif step[0] == "readd":  # with new vectors
            back, rows = removed[: step[1]], list(range(1900, 1900 + step[1]))
            writer.add(x[rows], np.array(back))
            live.update(dict(zip(back, rows, strict=True)))
        else:
            writer.compact()
        searcher = Searcher.load(tmp_path / "ix")
        assert len(searcher.index.segments) == num_segments, step
        assert ("tombstones" in searcher.manifest.files) == tombstones, step
        # every live item's stored vector is its own, whatever segment or base holds it
        held = searcher.tensors
        raw = searcher.item_keys.raw(held.ids.numpy()) if strings else held.ids.numpy()
        assert sorted(raw.tolist()) == sorted(live)
        items = x[[live[r] for r in raw.tolist()]]
        assert held.vectors is not None and torch.equal(held.vectors, codec.encode(items)), step
        # and re-ranked searches equal those of an index rebuilt from scratch over the live items
        rebuilt = Searcher.create(
            tmp_path / f"rebuilt-{number}",
            layer,
            (held.coarse_codes, held.codes),
            ids=raw,
            fast_scan=False,
            rerank=precision,
            vectors=items,
        )
        if precision == "float":  # (an sq8 rebuild trains its own range)
            assert_same_reranked(searcher, rebuilt, xq, k=10, factor=4, nprobe=3)
    on_disk = {p.name for p in (tmp_path / "ix").iterdir() if p.name.startswith("vectors-")}
    assert searcher.manifest.files["vectors"] in on_disk and len(on_disk) <= 2


def test_an_index_without_vectors_loads_and_refuses_a_rerank_factor(tmp_path: Path) -> None:
    layer, x = trained_layer("none", 8)
    Searcher.create(tmp_path / "ix", layer, x[:500])
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    del manifest["rerank"]  # as poeem wrote manifests before it kept vectors
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps(manifest))
    searcher = Searcher.load(tmp_path / "ix")
    assert searcher.vector_codec is None
    xq = correlated(3, DIM, seed=1)
    plain = searcher.search(xq, 5, nprobe=2)
    for off in (0, 1, 1.0):
        np.testing.assert_array_equal(searcher.search(xq, 5, nprobe=2, rerank=off)[1], plain[1])
    with pytest.raises(PoeemError, match=r"exported with --rerank.*poeem export RUN --out DIR --rerank sq8"):
        searcher.search(xq, 5, nprobe=2, rerank=4)
    searcher.add(x[500:510], np.arange(10_000, 10_010))  # updates of such an index write no vectors
    assert Searcher.load(tmp_path / "ix").vector_codec is None
    np.save(tmp_path / "q.npy", xq.numpy())
    result = CliRunner().invoke(
        app, ["search", str(tmp_path / "ix"), "--query-file", str(tmp_path / "q.npy"), "--rerank-factor", "4"]
    )
    assert result.exit_code != 0 and "--rerank sq8" in str(result.exception)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), 101, True, "4"])
def test_bad_rerank_factors_are_clear_errors(tmp_path: Path, bad: object) -> None:
    layer, x = trained_layer("none", 8)
    searcher = Searcher.create(tmp_path / "ix", layer, x[:300], rerank="sq8")
    with pytest.raises(PoeemError, match="rerank factor: expected a number between 0 and 100"):
        searcher.search(x[:2], 5, rerank=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rerank": {"precision": "int4"}}, "rerank.precision"),
        ({"rerank": {"precision": "sq8", "lo": [0.0] * 3, "hi": [1.0] * 3}}, "rerank.lo"),
        ({"rerank": None}, "a precision exactly when files has 'vectors'"),
    ],
)
def test_malformed_rerank_manifests_are_clear_errors(tmp_path: Path, change: dict, message: str) -> None:
    layer, x = trained_layer("none", 8)
    Searcher.create(tmp_path / "ix", layer, x[:300], rerank="sq8")
    manifest = json.loads((tmp_path / "ix" / "manifest.json").read_text())
    (tmp_path / "ix" / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(PoeemError, match=message):
        Searcher.load(tmp_path / "ix")


def test_sq8_trains_a_range_per_dimension_and_clamps_outside_it() -> None:
    x = torch.tensor([[0.0, -2.0, 5.0], [1.0, 2.0, 5.0]])
    codec = VectorCodec.fit("sq8", x)
    assert codec.lo.tolist() == [0.0, -2.0, 5.0] and codec.hi.tolist() == [1.0, 2.0, 5.0]
    stored = codec.encode(torch.tensor([[0.5, 0.0, 5.0], [3.0, -9.0, 7.0]]))
    assert stored.dtype == torch.uint8 and stored.tolist() == [[128, 128, 0], [255, 0, 0]]
    torch.testing.assert_close(codec.decode(stored)[1], torch.tensor([1.0, -2.0, 5.0]))
    again = VectorCodec.from_manifest(json.loads(json.dumps(codec.to_manifest())), 3)
    assert torch.equal(again.lo, codec.lo) and torch.equal(again.hi, codec.hi)
    assert [VectorCodec.fit(p, x).bytes_per_item(64) for p in ("float", "fp16", "sq8")] == [256, 128, 64]


def test_export_and_distill_keep_vectors_from_the_command_line(tmp_path: Path) -> None:
    run = tiny_run(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ix"), "--rerank", "sq8"])
    assert result.exit_code == 0, result.output
    assert "+ 16 bytes of sq8 vectors" in result.output
    searcher = Searcher.load(tmp_path / "ix")
    # the stored vectors are the run's final item embeddings (cosine: normalised), as the codes code them
    source = export_run(run, tmp_path / "ix2", recipe=IndexRecipe(rerank="float"))
    assert source is not None and source.vector_codec is not None
    items = source.index.base.vectors
    assert items is not None and torch.allclose(items.norm(dim=1), torch.ones(len(items)), atol=1e-5)
    codec = searcher.vector_codec
    assert codec is not None and torch.equal(searcher.index.base.vectors, codec.encode(items))
    xq = torch.nn.functional.normalize(correlated(4, 16, seed=3), dim=1)
    np.save(tmp_path / "q.npy", xq.numpy())
    args = [
        "search",
        str(tmp_path / "ix"),
        "--query-file",
        str(tmp_path / "q.npy"),
        "-k",
        "3",
        "--nprobe",
        "2",
    ]
    result = runner.invoke(app, [*args, "--rerank-factor", "8"])
    assert result.exit_code == 0, result.output
    ids = searcher.search(xq, 3, nprobe=2, rerank=8)[1]
    rows = [line.split(",") for line in result.output.strip().splitlines()[1:]]
    assert [int(r[2]) for r in rows] == ids.reshape(-1).tolist()
    bad = runner.invoke(app, [*args, "--rerank-factor", "-2"])
    assert bad.exit_code != 0 and "rerank factor" in str(bad.exception)
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ix3"), "--rerank", "int4"])
    assert result.exit_code != 0 and "--rerank: expected one of fp16, sq8, float" in str(result.exception)
    items_npy, queries_npy = tmp_path / "items.npy", tmp_path / "queries.npy"
    np.save(items_npy, correlated(600, 16, seed=4).numpy())
    np.save(queries_npy, correlated(100, 16, seed=6).numpy())
    distill = [
        "distill",
        "--items",
        str(items_npy),
        "--queries",
        str(queries_npy),
        "--out",
        str(tmp_path / "d"),
    ]
    distill += [
        "--num-subspaces",
        "4",
        "--num-coarse",
        "4",
        "--epochs",
        "1",
        "--rounds",
        "1",
        "--no-progress",
    ]
    result = runner.invoke(app, [*distill, "--teacher-k", "20", "--rerank", "fp16"])
    assert result.exit_code == 0, (result.output, result.exception)
    distilled = Searcher.load(tmp_path / "d")
    assert distilled.vector_codec is not None and distilled.vector_codec.precision == "fp16"
    assert torch.equal(distilled.index.base.vectors, torch.from_numpy(np.load(items_npy)).half())


def test_a_recipe_with_vectors_needs_one_process_and_the_help_names_the_default() -> None:
    assert IndexRecipe(rerank="sq8").needs_items and not IndexRecipe().needs_items
    with pytest.raises(PoeemError, match="--rerank: expected one of fp16, sq8, float"):
        IndexRecipe(rerank="int4")  # type: ignore[arg-type]
    import typer

    search = typer.main.get_command(app).commands["search"]  # type: ignore[attr-defined]
    help_text = next(p.help for p in search.params if p.name == "rerank_factor")
    assert f"Default: {rerank.DEFAULT_RERANK_FACTOR:g} on an index with stored vectors" in help_text


def test_merged_segments_keep_their_vectors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segments, "MAX_SEGMENTS", 3)
    layer, x = trained_layer("none", 8)
    searcher = Searcher.create(tmp_path / "ix", layer, x[:500], rerank="fp16")
    for start in range(500, 540, 10):
        searcher.add(x[start : start + 10], np.arange(start, start + 10))
    reloaded = Searcher.load(tmp_path / "ix")
    assert len(reloaded.index.segments) < 4  # merged into one, then one more
    held = reloaded.tensors
    assert held.vectors is not None and torch.equal(held.vectors, x[held.ids].half())
