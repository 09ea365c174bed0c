"""``poeem train --table-sharding torchrec`` on 2 gloo ranks: the id tables sharded by TorchRec,
saved by each rank, resumed, exported and searched like a one-process run. Skipped without
torchrec."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_topk, cli

from poeem import PoeemError
from poeem.model.sharded_tables import torchrec_available
from poeem.pipeline import load_run
from poeem.storage import read_tensors

pytestmark = pytest.mark.skipif(not torchrec_available(), reason="torchrec extra not installed")

RUN = (
    *("--data", "synthetic", "--num-pairs", "4000", "--dim", "16", "--poeem", "--num-coarse", "4"),
    *("--num-subspaces", "4", "--codebook-size", "16", "--warmup-steps", "4", "--buffer-size", "256"),
    *("--batch-size", "64", "--epochs", "1", "--no-progress", "--logger", "none"),
    *("--table-optimizer", "rowwise_adagrad"),
)
SHARDED = ("--table-sharding", "torchrec")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sharded run stopped after 6 steps and resumed to 12 on 2 ranks, and the same 12 steps
    in one process with whole tables."""
    root = tmp_path_factory.mktemp("sharding")
    stopped = ("--max-steps", "6", "--no-final-eval")  # no rank holds a whole table
    done = cli("train", "--run-dir", str(root / "sharded"), *RUN, *SHARDED, *stopped, torchrun=True)
    assert "not evaluated (--no-final-eval)" in done.stdout
    assert json.loads((root / "sharded" / "metrics.json").read_text())["rows"] == []
    resumed = ("--max-steps", "12", "--resume", "--final-eval")  # rank 0 evaluates
    cli("train", "--run-dir", str(root / "sharded"), *RUN, *SHARDED, *resumed, torchrun=True)
    cli("train", "--run-dir", str(root / "whole"), *RUN, "--max-steps", "12")
    return root / "sharded", root / "whole"


def test_a_sharded_run_resumed_trains_like_one_process(runs: tuple[Path, Path]) -> None:
    evaluated = {r: json.loads((r / "metrics.json").read_text())["rows"] for r in runs}
    served = [next(row for row in rows if row["method"] == "poeem") for rows in evaluated.values()]
    assert abs(served[0]["recall@20"] - served[1]["recall@20"]) < 1e-3  # rank 0 evaluated it whole
    sharded, whole = (load_run(r)[1].state_dict() for r in runs)
    assert sharded.keys() == whole.keys()
    for name, value in sharded.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, whole[name], rtol=0, atol=1e-5, msg=name)
        else:
            assert torch.equal(value, whole[name]), name


def test_each_rank_saves_its_own_rows(runs: tuple[Path, Path]) -> None:
    sharded, _ = runs
    saved = read_tensors(sharded / "model.safetensors", "run", "")
    assert not any(name.endswith("embedding.weight") for name in saved)  # the tables are not in it
    (tag,) = [p for p in (sharded / "tables").iterdir()]  # only the last save is kept
    assert tag.name.startswith("step-000000000012-")
    for tower in ("query_tower", "item_tower"):
        assert len(list(tag.glob(f"{tower}-*.safetensors"))) == 2  # one file per rank
    (checkpoint,) = list((sharded / "checkpoint_tables").iterdir())
    assert checkpoint.name.startswith("step-000000000012-")


def test_a_sharded_run_exports_and_searches_like_one_process(runs: tuple[Path, Path], tmp_path: Path) -> None:
    (tmp_path / "queries.txt").write_text("\n".join(map(str, range(50))))
    found = []
    for run in runs:
        cli("export", str(run), "--out", str(tmp_path / run.name), "--no-fast-scan")
        args = ["--query-file", str(tmp_path / "queries.txt"), "-k", "10", "--nprobe", "2"]
        printed = cli("search", str(tmp_path / run.name), *args).stdout.splitlines()[1:]  # poeem search
        rows = np.array([line.split(",") for line in printed], dtype=np.float64)  # query,rank,id,score
        assert len(rows) == 500
        found.append((rows[:, 3].reshape(50, 10), rows[:, 2].astype(np.int64).reshape(50, 10)))
    assert_same_topk(*found[0], *found[1])


def test_table_sharding_is_refused_where_it_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from poeem import distributed
    from poeem.training import TrainConfig
    from poeem.training.table_sharding import check_table_sharding

    done = cli("train", "--run-dir", str(tmp_path / "one"), *RUN, *SHARDED, "--max-steps", "2", ok=False)
    assert "--table-sharding torchrec: expected torchrun (several processes), got one process" in done.stderr
    after = ("--index-schedule", "after_training")
    done = cli("train", "--run-dir", str(tmp_path / "two"), *RUN, *SHARDED, *after, ok=False)
    assert "--index-schedule: expected joint with sharded tables" in done.stderr
    monkeypatch.setattr(distributed, "is_active", lambda: True)  # as under torchrun
    sharded = TrainConfig(table_sharding="torchrec", table_optimizer="rowwise_adagrad")
    check_table_sharding(sharded, True, "float32")  # what the runs above train with
    for config, has_id_tables, dtype, message in (
        (
            TrainConfig(table_sharding="torchrec"),
            True,
            "float32",
            "expected --table-optimizer rowwise_adagrad",
        ),
        (sharded, False, "float32", "expected id towers, got text towers"),
        (sharded, True, "bfloat16", "expected float32 tables"),
        (replace(sharded, weight_decay=0.1), True, "float32", "expected no weight decay"),
    ):
        with pytest.raises(PoeemError, match=message):
            check_table_sharding(config, has_id_tables, dtype)


def test_each_rank_exports_its_own_item_rows_and_the_index_is_byte_identical(
    runs: tuple[Path, Path], tmp_path: Path
) -> None:
    from poeem.model.towers import TableRows

    sharded, _ = runs
    _, model = load_run(sharded, item_share=True)  # what each rank of the export loads
    assert isinstance(model.item_tower.embedding, TableRows)
    cli("export", str(sharded), "--out", str(tmp_path / "one"))
    cli("export", str(sharded), "--out", str(tmp_path / "ranks"), torchrun=True)
    hashes = [json.loads((tmp_path / d / "manifest.json").read_text())["sha256"] for d in ("one", "ranks")]
    assert hashes[0] == hashes[1]  # FAISS file, codes and query tower alike


def test_a_damaged_shard_on_resume_is_one_clear_error(runs: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import save_file

    run = Path(shutil.copytree(runs[0], tmp_path / "run"))
    (tag,) = (run / "checkpoint_tables").iterdir()
    shard = sorted(tag.glob("item_tower-*.safetensors"))[0]
    save_file({"rows": read_tensors(shard, "shard", "")["rows"]}, str(shard))  # no Adagrad sums
    resumed = ("--max-steps", "14", "--resume", "--nproc", "2")
    done = cli("train", "--run-dir", str(run), *RUN, *SHARDED, *resumed, ok=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "FAILED" not in done.stderr
    (error,) = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: table shard '{shard}': expected a tensor 'sum', got tensors ['rows']")
