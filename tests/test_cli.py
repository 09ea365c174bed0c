import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_dir, trained_layer
from typer.testing import CliRunner

from poeem import Searcher
from poeem.cli import app
from poeem.pipeline import load_run

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_train_evaluate_export_search_add_remove(tmp_path: Path) -> None:
    run = tmp_path / "run"
    out = invoke(
        "train",
        "--run-dir",
        run,
        "--data",
        "synthetic",
        "--config",
        write_config(tmp_path),
        "--poeem",
        "--num-coarse",
        "4",
        "--num-subspaces",
        "4",
        "--codebook-size",
        "16",
        "--warmup-steps",
        "5",
        "--buffer-size",
        "256",
        "--dim",
        "16",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--logger",
        "none",
        "--refit",
        "none",  # serve the codes training computed, which this test compares
    )
    assert "poeem" in out and "faiss-ivfpq" in out
    assert "precision@10" in invoke("evaluate", run, "--nprobe", "2")
    table = invoke("evaluate", run, "--nprobe", "1", "--nprobe", "4", "--lists-ceiling").splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("method"))
    cols = table[header].split()
    rows = {
        (row["method"], int(row["nprobe"])): row
        for row in (dict(zip(cols, r, strict=True)) for r in map(str.split, table[header + 1 :]))
    }
    assert rows[("poeem", 1)]["index"].endswith("x4fs")  # the index `poeem export` writes
    ceiling, exact = rows[("poeem-lists-flat", 4)], rows[("exact", 1)]
    assert ceiling["precision@10"] == exact["precision@10"]  # every list probed: exact search
    assert (
        rows[("poeem-lists-flat", 1)]["codes_scanned"] == rows[("poeem", 1)]["codes_scanned"]
    )  # same routing
    index = tmp_path / "ix"
    assert "exported 10000 items" in invoke("export", run, "--out", index)
    as_trained = tmp_path / "ix-trained"
    assert "exported 10000 items" in invoke("export", run, "--out", as_trained, "--from-training", "codes")
    memory = load_run(run)[1].index.trained
    seen = memory.seen()
    assert 0 < int(seen.sum()) < 10000  # one epoch of 128-pair batches after the warm start
    trained, encoded = Searcher.load(as_trained).tensors, Searcher.load(index).tensors
    assert torch.equal(trained.codes[seen], memory.codes[seen].long())
    assert torch.equal(trained.coarse_codes[seen], memory.coarse_codes[seen].long())
    assert torch.equal(trained.codes[~seen], encoded.codes[~seen])  # the rest encoded as by default
    # the default export keeps the lists of training and encodes the residuals
    assert torch.equal(encoded.coarse_codes[seen], memory.coarse_codes[seen].long())
    invoke("export", run, "--out", tmp_path / "ix-full", "--from-training", "none")
    full = Searcher.load(tmp_path / "ix-full").tensors
    assert torch.equal(full.codes[~seen], encoded.codes[~seen])
    assert torch.equal(full.coarse_codes[~seen], encoded.coarse_codes[~seen])
    bad = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "no"), "--from-training", "code"])
    assert bad.exit_code != 0 and "'lists' or 'codes'" in str(bad.exception)
    assert not (tmp_path / "no").exists()
    (tmp_path / "q.txt").write_text("12\n4512\n")
    lines = invoke(
        "search", index, "--query-file", tmp_path / "q.txt", "-k", "3", "--nprobe", "4"
    ).splitlines()
    assert lines[0] == "query,rank,id,score" and len(lines) == 7
    np.save(tmp_path / "xq.npy", np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32))
    invoke(
        "search",
        index,
        "--query-file",
        tmp_path / "xq.npy",
        "--out",
        tmp_path / "res.csv",
        "--backend",
        "torch",
    )
    assert (tmp_path / "res.csv").read_text().count("\n") == 21
    np.save(tmp_path / "items.npy", np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32))
    (tmp_path / "ids.txt").write_text("20000\n20001\n20002\n")
    assert "10003 items" in invoke(
        "add", index, "--items", tmp_path / "items.npy", "--ids", tmp_path / "ids.txt"
    )
    assert "removed 3 items" in invoke("remove", index, "--ids", tmp_path / "ids.txt")


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text("[data]\nnum_pairs = 4000\n[eval]\nks = [10]\nnprobes = [1]\n[train]\nprogress = false\n")
    return path


def test_bad_input_is_one_clear_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "poeem.cli", "train", "--data", "movielens", "--run-dir", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: movielens data: expected a path, got none. Fix: pass --data-path PATH"
    ]
    result = subprocess.run(
        [sys.executable, "-m", "poeem.cli", "search", str(tmp_path), "--query-file", "x.npy"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no manifest.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_import_poeem_stays_light() -> None:
    """`import poeem` must not pull in pandas, the data loaders or the trainer."""
    code = (
        "import sys, poeem; heavy = [m for m in ('pandas', 'pyarrow', 'poeem.training.trainer', "
        "'poeem.data', 'poeem.pipeline') if m in sys.modules]; print(heavy)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_float_ids_in_npy_files_are_refused(tmp_path: Path) -> None:
    make_dir(tmp_path)
    np.save(tmp_path / "items.npy", np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32))
    np.save(tmp_path / "ids.npy", np.array([20000.7, 20001.2]))
    result = runner.invoke(
        app,
        [
            "add",
            str(tmp_path / "ix"),
            "--items",
            str(tmp_path / "items.npy"),
            "--ids",
            str(tmp_path / "ids.npy"),
        ],
    )
    assert result.exit_code != 0 and "expected 64-bit integer ids, got dtype float64" in str(result.exception)


# Fills every new float32 numpy buffer with FLT_MAX: the state in which faiss 1.15's fast-scan
# search (reading its uninitialised output as a threshold) used to drop every row.
POISONED_EMPTY = (
    "import sys, numpy as np\n"
    "empty = np.empty\n"
    "def poisoned(*args, **kwargs):\n"
    "    out = empty(*args, **kwargs)\n"
    "    if out.dtype == np.float32:\n"
    "        out.fill(np.finfo(np.float32).max)\n"
    "    return out\n"
    "np.empty = poisoned\n"
    "from poeem.cli import main\n"
    "sys.argv = ['poeem', *sys.argv[1:]]\n"
    "main()\n"
)


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("poison", [False, True])
def test_first_search_of_a_fast_scan_index_returns_k_rows(tmp_path: Path, threads: str, poison: bool) -> None:
    from poeem import Searcher

    layer, x = trained_layer("none", 8, k=16)
    Searcher.create(tmp_path / "ix", layer, x, metric="ip", fast_scan=True)
    np.save(tmp_path / "q.npy", np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32))
    args = ["search", str(tmp_path / "ix"), "--query-file", str(tmp_path / "q.npy"), "-k", "3"]
    launch = ["-c", POISONED_EMPTY] if poison else ["-m", "poeem"]
    command = [sys.executable, *launch, *args]
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    rows = result.stdout.strip().splitlines()[1:]
    assert len(rows) == 40 * 3, result.stdout


def test_bfloat16_tables_train_export_and_serve_query_ids(tmp_path: Path) -> None:
    run, index = tmp_path / "run", tmp_path / "ix"
    layer = ["--num-coarse", "4", "--num-subspaces", "4", "--codebook-size", "16", "--buffer-size", "256"]
    invoke(
        "train", "--run-dir", run, "--config", write_config(tmp_path), "--poeem", *layer,
        "--warmup-steps", "5",
        "--dim", "16", "--epochs", "1", "--batch-size", "128", "--logger", "none",
        "--table-dtype", "bfloat16", "--table-optimizer", "rowwise_adagrad", "--table-lr", "0.05",
    )  # fmt: skip
    _, model = load_run(run)
    assert model.item_tower.embedding.weight.dtype == torch.bfloat16
    invoke("export", run, "--out", index, "--from-training", "none")
    searcher = Searcher.load(index)
    assert searcher.query_tower.embedding.weight.dtype == torch.bfloat16
    ids = torch.tensor([3, 77, 4012])
    with torch.no_grad():
        torch.testing.assert_close(searcher.embed_queries(ids.numpy()), model.encode_queries(ids))
        coarse, codes = model.index.encode(model.all_item_embeddings())
    assert torch.equal(searcher.tensors.codes, codes.long()) and torch.equal(
        searcher.tensors.coarse_codes, coarse
    )
