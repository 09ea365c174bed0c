"""Bad input at the public boundaries gets a clear error before any work, and a finished
training is never lost to a later stage."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import tiny_config, trained_layer
from typer.testing import CliRunner

import poeem.pipeline.recipe as recipe_module
from poeem import Searcher
from poeem.cli import app
from poeem.errors import PoeemError
from poeem.ids import check_ids, check_raw_ids, integer_text
from poeem.pipeline import export_run, train_run
from poeem.pipeline.config import RunConfig
from poeem.pipeline.distill import distill_embeddings
from poeem.pipeline.run_dir import read_config
from poeem.training.distill import DistillConfig


def poeem_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``poeem ARGS`` as a user runs it (the real entry point, its exit code and stderr)."""
    command = [sys.executable, "-m", "poeem", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)


def tiny_table(path: Path, num_items: int) -> Path:
    """100 users' interactions with ``num_items`` items, as a CSV with a time column."""
    rng = np.random.default_rng(0)
    rows = [f"{u},{rng.integers(num_items)},{t}" for u in range(100) for t in range(8)]
    path.write_text("user,item,ts\n" + "\n".join(rows) + "\n")
    return path


def test_a_catalogue_smaller_than_k_is_refused_before_the_first_step(tmp_path: Path) -> None:
    data = tiny_table(tmp_path / "tiny.csv", 12)
    done = poeem_cli(
        "train", "--run-dir", tmp_path / "r", "--data", "table", "--data-path", data,
        "--query-column", "user", "--item-column", "item", "--time-column", "ts",
        "--epochs", "4", "--dim", "16", "--num-coarse", "2", "--num-subspaces", "4",
        "--codebook-size", "16", "--batch-size", "64", "--warmup-steps", "2",
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "at least max(K, coarse_K) = 16 items" in done.stderr and "12 items" in done.stderr
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()  # no step ran


def tiny_refit_config(**train: object) -> RunConfig:
    """The shared tiny run, refitted after training (``train``: more TrainConfig fields)."""
    cfg = tiny_config()
    return replace(cfg, train=replace(cfg.train, refit="rq", **train))


def test_a_failing_refit_keeps_the_trained_model_and_says_how_to_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(recipe_module, "refit_layer", broken)
    with pytest.raises(PoeemError, match="training finished and is saved in") as caught:
        train_run(tiny_refit_config(), tmp_path / "run")
    assert "poeem export" in str(caught.value) and "--refit rq" in str(caught.value)
    cfg, _ = read_config(tmp_path / "run")
    assert cfg.train.refit is None  # the folder says what it holds: the index as trained
    searcher = export_run(tmp_path / "run", tmp_path / "ix")
    assert searcher is not None and searcher.ntotal > 0


def test_a_completed_refit_is_recorded_with_both_indexes(tmp_path: Path) -> None:
    train_run(tiny_refit_config(distill_epochs=0), tmp_path / "run")
    assert read_config(tmp_path / "run")[0].train.refit == "rq"
    assert (tmp_path / "run" / "index_as_trained.safetensors").is_file()


def test_ids_are_checked_before_the_distillation_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the distillation ran")

    monkeypatch.setattr(recipe_module, "distill_index", never)
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    settings = {"num_coarse": 4, "num_subspaces": 2, "codebook_size": 16}
    for ids, message in (
        (np.array([1, 1, *range(2, 200)]), "duplicates"),
        (np.arange(200) - 5, "non-negative ids"),
        (np.array(["a", "a", *map(str, range(2, 200))]), "duplicates"),
        (np.arange(199), "one id per item (200)"),
    ):
        with pytest.raises(PoeemError, match=message.replace("(", r"\(").replace(")", r"\)")):
            distill_embeddings(x, x[:50], tmp_path / "ix", settings, ids=ids, progress=False)


def test_a_1d_items_array_names_the_shape_it_needs(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.zeros(64, np.float32))
    args = [
        "distill",
        "--items",
        tmp_path / "x.npy",
        "--queries",
        tmp_path / "x.npy",
        "--out",
        tmp_path / "ix",
    ]
    done = poeem_cli(*args, "--num-subspaces", "2")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "expected shape (n, dim), got shape (64,)" in done.stderr and "-1" not in done.stderr


def test_an_untrained_faiss_file_is_a_clear_error(tmp_path: Path) -> None:
    faiss.write_index(
        faiss.index_factory(8, "IVF4,PQ2x4", faiss.METRIC_INNER_PRODUCT), str(tmp_path / "u.faiss")
    )
    x = np.random.default_rng(0).normal(size=(100, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    args = ["distill", "--items", tmp_path / "x.npy", "--queries", tmp_path / "x.npy"]
    done = poeem_cli(*args, "--from-faiss", tmp_path / "u.faiss", "--out", tmp_path / "ix")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "expected a trained index, got an untrained one" in done.stderr


def test_mixed_ids_quote_the_bad_one() -> None:
    mixed = np.array([1, "x"], dtype=object)
    with pytest.raises(PoeemError, match=r"e\.g\. 'x'"):
        check_ids(mixed)
    with pytest.raises(PoeemError, match=r"e\.g\. 'x'"):
        check_ids(np.array(["1", "x"]))
    with pytest.raises(PoeemError, match=r"e\.g\. 1\.0"):
        check_raw_ids(np.array([1.0, 2.5]), 2)


@pytest.mark.parametrize(
    ("text", "integer"), [("12", True), ("-3", True), ("²", False), ("١٢", False), ("", False)]
)
def test_only_ascii_digits_spell_an_integer_id(text: str, integer: bool) -> None:
    assert integer_text(text) is integer


def test_search_excludes_with_unicode_digits_are_ignored_not_a_traceback(tmp_path: Path) -> None:
    layer, x = trained_layer("none", 8)
    Searcher.create(tmp_path / "ix", layer, x[:300], metric="ip")
    np.save(tmp_path / "q.npy", x[:2].numpy())
    (tmp_path / "skip.csv").write_text("0,²\n0,١\n1,3\n")
    result = CliRunner().invoke(
        app,
        ["search", str(tmp_path / "ix"), "--query-file", str(tmp_path / "q.npy"), "-k", "5",
         "--exclude", str(tmp_path / "skip.csv"), "--nprobe", "8"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    searcher = Searcher.load(tmp_path / "ix")
    expected = searcher.search(x[:2], 5, nprobe=8, exclude=[[], [3]])[1]
    rows = [line.split(",") for line in result.output.strip().splitlines()[1:]]
    assert [int(r[2]) for r in rows] == expected.ravel().tolist()
    assert torch.isin(torch.tensor(3), torch.tensor(expected[1])).item() is False


def test_ids_outside_the_trained_rows_name_their_kind() -> None:
    from poeem.ids import known_rows

    assert torch.equal(known_rows([2, 0], None, 3, "item"), torch.tensor([2, 0]))
    for kind, plural in (("query", "queries"), ("item", "items")):
        with pytest.raises(
            PoeemError, match=rf"{kind} ids: expected ids in \[0, 3\), got max 7\. Fix: pass ids of {plural}"
        ):
            known_rows([7], None, 3, kind)


@pytest.mark.parametrize("scale", [1e19, 1e30])
def test_items_too_long_for_float32_distances_are_named_so_not_nan(tmp_path: Path, scale: float) -> None:
    """Regression: finite items scaled by 1e30 were reported as "NaN or inf"."""
    x = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    np.save(tmp_path / "items.npy", x * scale)
    np.save(tmp_path / "queries.npy", x[:50])
    done = poeem_cli(
        "distill", "--items", tmp_path / "items.npy", "--queries", tmp_path / "queries.npy",
        "--out", tmp_path / "ix", "--num-subspaces", "2", "--num-coarse", "4",
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "items: expected vectors of norm at most 9.2e+18" in lines[0] and "NaN" not in lines[0]
    assert "Fix: divide every vector by one constant" in lines[0]
    settings = {"num_coarse": 4, "num_subspaces": 2, "codebook_size": 16}
    distill_embeddings(x * 1e18, x[:50], tmp_path / "ok", settings, progress=False, config=TINY_DISTILL)


TINY_DISTILL = DistillConfig(rounds=1, epochs=1, teacher_k=10)
