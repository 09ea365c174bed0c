"""Export and search use exactly the model's embeddings (features included) and speak the
data's own ids. Regressions: features were dropped at export (every code differed)
and raw ids were lost (a raw user id silently answered for another user)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import table_config, write_table
from typer.testing import CliRunner

from poeem import PoeemError, Searcher
from poeem.cli import app
from poeem.pipeline import export_run, load_run, train_run
from poeem.pipeline.recipe import IndexRecipe
from poeem.pipeline.run_dir import read_artifacts


@pytest.fixture(scope="module")
def table_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Searcher]:
    tmp = tmp_path_factory.mktemp("table")
    run = tmp / "run"
    train_run(table_config(write_table(tmp / "events.csv")), run)
    every_item_encoded = IndexRecipe(from_training=None)
    return run, export_run(run, tmp / "ix", recipe=every_item_encoded)


def test_export_encodes_items_with_their_features(table_run: tuple[Path, Searcher]) -> None:
    run, searcher = table_run
    _, model = load_run(run)
    art = read_artifacts(run)
    assert art.item_features is not None and art.item_features.shape == (model.num_items, 2)
    with torch.no_grad():
        coarse_codes, codes = model.index.encode(model.all_item_embeddings(art.item_features))
    assert torch.equal(searcher.tensors.codes, codes.long())
    assert torch.equal(searcher.tensors.coarse_codes, coarse_codes.long())
    with pytest.raises(PoeemError, match="tower features: expected 2 numeric features per row, got none"):
        model.all_item_embeddings()  # the tower no longer skips its feature MLP silently


def test_streaming_item_codes_equal_encoding_every_embedding_at_once(
    table_run: tuple[Path, Searcher],
) -> None:
    """Export embeds and encodes in chunks with their features; the codes are those of one pass."""
    from poeem.export.item_codes import item_codes

    run, _ = table_run
    _, model = load_run(run)
    features = read_artifacts(run).item_features
    with torch.no_grad():
        whole = model.all_item_embeddings(features)
        part = model.all_item_embeddings(features, batch_size=3, rows=slice(5, 12))
        torch.testing.assert_close(part, whole[5:12], rtol=0, atol=1e-6)  # MLP sums vary with batch size
        expected = model.index.encode(whole)
    coarse, codes = item_codes(model, features, chunk=7)  # 28 full chunks and a short one
    assert coarse is not None and expected[0] is not None
    assert torch.equal(codes, expected[1]) and codes.dtype == expected[1].dtype
    assert torch.equal(coarse, expected[0]) and coarse.dtype == expected[0].dtype


def test_search_by_raw_query_id_matches_the_model(table_run: tuple[Path, Searcher]) -> None:
    run, searcher = table_run
    _, model = load_run(run)
    art = read_artifacts(run)
    raw_users = np.array(["user-007", "user-042"])
    rows = torch.from_numpy(art.query_keys.rows(raw_users))
    with torch.no_grad():
        expected_q = model.encode_queries(rows, art.query_features[rows])
    torch.testing.assert_close(searcher.embed_queries(raw_users), expected_q)
    _, ids = searcher.search(searcher.embed_queries(raw_users), 5, nprobe=4)
    assert ids.dtype.kind == "U" and all(str(i).startswith("sku-") for i in ids.ravel())
    with pytest.raises(PoeemError, match=r"unknown ids \['user-999'\]"):
        searcher.embed_queries(np.array(["user-999"]))


def test_string_item_ids_through_add_and_remove(table_run: tuple[Path, Searcher], tmp_path: Path) -> None:
    _, exported = table_run
    import shutil

    shutil.copytree(exported.directory, tmp_path / "ix")
    searcher = Searcher.load(tmp_path / "ix")
    new = torch.randn(2, 16)
    searcher.add(new, np.array(["sku-new-1", "sku-new-2"]))
    reloaded = Searcher.load(tmp_path / "ix")
    _, ids = reloaded.search(new, 1, nprobe=4)
    assert ids[:, 0].tolist() == ["sku-new-1", "sku-new-2"]
    with pytest.raises(PoeemError, match=r"existing ids, e\.g\. \['sku-new-1'\]"):
        reloaded.add(new[:1], np.array(["sku-new-1"]))
    assert reloaded.remove(np.array(["sku-new-2"])) == 1
    with pytest.raises(PoeemError, match=r"unknown ids \['sku-nope'\]"):
        reloaded.remove(np.array(["sku-nope"]))


def test_movielens_raw_ids_end_to_end_through_the_cli(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    lines = []
    for t in range(2500):
        user = 1000 + int(rng.integers(40)) * 7  # raw user ids far from 0..n-1
        movie = 500 + int((user + rng.integers(40)) % 150) * 3
        lines.append(f"{user}\t{movie}\t{int(rng.integers(1, 6))}\t{t}")
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("\n".join(lines) + "\n")
    runner = CliRunner()
    args = [
        "train",
        "--run-dir",
        str(tmp_path / "run"),
        "--data",
        "movielens",
        "--data-path",
        str(tmp_path / "ml"),
    ]
    args += [
        "--poeem",
        "--num-coarse",
        "4",
        "--num-subspaces",
        "4",
        "--codebook-size",
        "16",
        "--warmup-steps",
        "3",
    ]
    args += ["--buffer-size", "256", "--dim", "16", "--epochs", "1", "--batch-size", "128"]
    args += ["--logger", "none", "--no-progress", "--k", "10"]
    args += ["--routing-weight", "0.5", "--routing-lists", "batch", "--reseed-after", "7"]
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    layer = json.loads((tmp_path / "run" / "config.json").read_text())["model"]["poeem"]
    assert layer["routing_weight"] == 0.5 and layer["reseed_after"] == 7
    assert layer["routing_lists"] == "batch"
    result = runner.invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "ix")])
    assert result.exit_code == 0, result.output
    (tmp_path / "users.txt").write_text("1007\n1014\n")
    result = runner.invoke(app, ["search", str(tmp_path / "ix"), "--query-file", str(tmp_path / "users.txt")])
    assert result.exit_code == 0, result.output
    rows = [line.split(",") for line in result.output.strip().splitlines()[1:]]
    assert {r[0] for r in rows} == {"1007", "1014"}
    movies = {int(r[2]) for r in rows}
    assert all(m >= 500 and (m - 500) % 3 == 0 for m in movies)  # raw MovieLens ids, not rows
    # the same answer as the model itself, for the raw user 1014
    _, model = load_run(tmp_path / "run")
    art = read_artifacts(tmp_path / "run")
    row = torch.from_numpy(art.query_keys.rows([1014]))
    searcher = Searcher.load(tmp_path / "ix")
    _, ids = searcher.search(model.encode_queries(row).detach(), 10)
    assert [int(r[2]) for r in rows if r[0] == "1014"] == ids[0][ids[0] >= 0].tolist()
    (tmp_path / "bad.txt").write_text("1007\n1\n")
    result = runner.invoke(app, ["search", str(tmp_path / "ix"), "--query-file", str(tmp_path / "bad.txt")])
    assert result.exit_code != 0 and "unknown ids [1]" in str(result.exception)
