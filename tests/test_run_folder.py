"""What a run or index folder names is read from that folder only, and checked before use: shard
files, the tag of the tables, tower names and index files that lead elsewhere are refused, and
so are shard files that do not match their list. Runs with sharded tables are made here from a
one-process run, in the very format the ranks write (no torchrun, no torchrec)."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_run
from safetensors.torch import save_file

from poeem import PoeemError
from poeem.model.sharded_tables import TableShards, save_table_shards
from poeem.pipeline import load_run
from poeem.storage import read_tensors, save_tensors
from poeem.training.table_sharding import RUN_TABLES, load_tables, tables_metadata

TAG = "step-000000000010-00c0ffee"
TOWERS = ("query_tower", "item_tower")


class OneRankTable:
    """What :func:`save_table_shards` asks of a sharded table, for a whole table in one process."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, (self.rows, self.dim) = weight, weight.shape

    def local_state(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        return 0, self.weight, torch.rand(self.rows)


def shard_tables(run: Path) -> None:
    """Rewrite a finished run as a run with sharded tables writes it: ``tables/<tag>/`` and a
    ``model.safetensors`` without the tables, whose header names them."""
    weights = read_tensors(run / "model.safetensors", "run", "")
    for tower in TOWERS:
        save_table_shards(
            OneRankTable(weights.pop(f"{tower}.embedding.weight")), run / RUN_TABLES / TAG, tower
        )
    save_tensors(run / "model.safetensors", weights, tables_metadata(list(TOWERS), TAG))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run with whole tables, and the same run with sharded tables."""
    root = tmp_path_factory.mktemp("runs")
    whole = tiny_run(root)
    sharded = root / "sharded"
    shutil.copytree(whole, sharded)
    shard_tables(sharded)
    return whole, sharded


@pytest.fixture()
def run(runs: tuple[Path, Path], tmp_path: Path) -> Path:
    """A copy of the sharded run to tamper with, next to an untouched copy ``other``."""
    shutil.copytree(runs[1], tmp_path / "other")
    return Path(shutil.copytree(runs[1], tmp_path / "run"))


def shard_list(run: Path, tower: str = "item_tower") -> Path:
    return run / RUN_TABLES / TAG / f"{tower}.json"


def edit_list(run: Path, change: Callable[[dict], None], tower: str = "item_tower") -> None:
    listed = json.loads(shard_list(run, tower).read_text())
    change(listed)
    shard_list(run, tower).write_text(json.dumps(listed))


def shard_file(run: Path, tower: str = "item_tower") -> Path:
    (shard,) = json.loads(shard_list(run, tower).read_text())["shards"]
    return shard_list(run, tower).parent / shard["file"]


def name_tables(run: Path, tag: object = TAG, towers: object = TOWERS) -> None:
    """Rewrite the header of ``model.safetensors`` to name ``tag`` and ``towers``."""
    weights = read_tensors(run / "model.safetensors", "run", "")
    save_file(weights, str(run / "model.safetensors"), {"tables": json.dumps({"tag": tag, "towers": towers})})


def test_a_run_with_sharded_tables_loads_as_the_run_with_whole_ones(runs: tuple[Path, Path]) -> None:
    whole, sharded = (load_run(r)[1].state_dict() for r in runs)
    assert whole.keys() == sharded.keys()
    assert all(torch.equal(value, sharded[name]) for name, value in whole.items())


def set_file(name: str) -> Callable[[Path], None]:
    return lambda run: edit_list(run, lambda listed: listed["shards"][0].update(file=name))


def link_to_other_run(run: Path) -> None:
    file = shard_file(run)
    file.unlink()
    file.symlink_to(shard_file(run.parent / "other"))


def link_tables_elsewhere(run: Path) -> None:
    (run / RUN_TABLES).rename(run.parent / "moved")
    (run / RUN_TABLES).symlink_to(run.parent / "moved")


OTHER_SHARD = f"../../../other/{RUN_TABLES}/{TAG}/item_tower-000000000000.safetensors"
OUTSIDE = [
    pytest.param(set_file("../../../etc/passwd"), "leads to", id="file ../../../etc/passwd"),
    pytest.param(set_file("/etc/passwd"), "got '/etc/passwd'", id="file absolute"),
    pytest.param(set_file(OTHER_SHARD), "leads to", id="file of another run"),
    pytest.param(link_to_other_run, "leads to", id="file linked to another run"),
    pytest.param(set_file(""), "got ''", id="file empty"),
    pytest.param(set_file(7), "got 7", id="file a number"),
    pytest.param(lambda run: name_tables(run, f"../../other/{RUN_TABLES}/{TAG}"), "leads to", id="tag ../"),
    pytest.param(lambda run: name_tables(run, "/tmp"), "got '/tmp'", id="tag absolute"),
    pytest.param(lambda run: name_tables(run, "."), "leads to", id="tag the tables folder"),
    pytest.param(lambda run: name_tables(run, ["x"]), "got ['x']", id="tag a list"),
    pytest.param(
        lambda run: name_tables(run, TAG, ["../../other/item_tower", "query_tower"]),
        "expected towers among ['query_tower', 'item_tower']",
        id="tower ../",
    ),
    pytest.param(
        lambda run: name_tables(run, TAG, ["item_tower", "item_tower"]), "towers among", id="tower twice"
    ),
    pytest.param(link_tables_elsewhere, "leads to", id="tables folder linked elsewhere"),
]


@pytest.mark.parametrize("tamper, message", OUTSIDE)
def test_names_that_lead_out_of_the_run_folder_are_refused(
    run: Path, tamper: Callable[[Path], None], message: str
) -> None:
    tamper(run)
    with pytest.raises(PoeemError, match=r"expected the name of a file inside|towers among") as err:
        load_run(run)
    assert message in str(err.value)


def test_a_checkpoint_naming_tables_outside_its_folder_is_refused(run: Path) -> None:
    _, model = load_run(run)
    for tag in ("../tables", f"../../other/{RUN_TABLES}/{TAG}", "/etc", None):
        with pytest.raises(PoeemError, match="the tables a checkpoint names: expected the name of a file"):
            load_tables(model, run / RUN_TABLES, tag)


def rewrite_shard(tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Callable:
    def tamper(run: Path) -> None:
        file = shard_file(run)
        save_file(tensors(read_tensors(file, "shard", "")), str(file))

    return tamper


def set_sizes(**sizes: int | str) -> Callable[[Path], None]:
    def change(listed: dict) -> None:
        listed.update({k: v for k, v in sizes.items() if k in ("rows", "dim")})
        listed["shards"][0].update({k: v for k, v in sizes.items() if k in ("first", "count")})

    return lambda run: edit_list(run, change)


def truncate(run: Path) -> None:
    file = shard_file(run)
    file.write_bytes(file.read_bytes()[:-100])


ITEMS = 10_000  # the items of tiny_run's data, as config.json gives
DAMAGED = [
    pytest.param(
        rewrite_shard(lambda t: {"rows": t["rows"][:-1], "sum": t["sum"][:-1]}),
        f"float32 (F32) and shape ({ITEMS}, 16), as the table's list says, got F32 of shape ({ITEMS - 1}, ",
        id="too few rows",
    ),
    pytest.param(
        rewrite_shard(lambda t: {"rows": t["rows"][:, :8].contiguous(), "sum": t["sum"]}),
        f"got F32 of shape ({ITEMS}, 8)",
        id="wrong width",
    ),
    pytest.param(
        rewrite_shard(lambda t: {"rows": t["rows"]}),
        "expected a tensor 'sum', got tensors ['rows']",
        id="no sum",
    ),
    pytest.param(
        rewrite_shard(lambda t: {"rows": t["rows"].long(), "sum": t["sum"]}),
        f"got I64 of shape ({ITEMS}, 16)",
        id="int64 rows",
    ),
    pytest.param(
        rewrite_shard(lambda t: {"rows": t["rows"].double(), "sum": t["sum"]}), "got F64", id="float64 rows"
    ),
    pytest.param(
        rewrite_shard(lambda t: {"rows": t["rows"], "sum": t["sum"][:-1]}),
        f"shape ({ITEMS},)",
        id="short sum",
    ),
    pytest.param(set_sizes(dim=8), f"shape ({ITEMS}, 8), as the table's list says", id="wrong JSON dim"),
    pytest.param(
        set_sizes(rows=10**12), f"shards of {10**12} rows, its 'rows', got {ITEMS}", id="rows 10^12"
    ),
    pytest.param(
        set_sizes(rows=10**12, count=10**12),
        f"shape ({10**12}, 16), as the table's list",
        id="rows+count 10^12",
    ),
    pytest.param(set_sizes(rows="10000"), "'10000' is not an integer", id="rows a string"),
    pytest.param(set_sizes(dim=True), "True is not an integer", id="dim true"),
    pytest.param(set_sizes(count=0, rows=0), "0 is not an integer >= 1", id="empty shard"),
    pytest.param(set_sizes(first=1), "a gap or overlap at row 0", id="gap"),
    pytest.param(lambda run: shard_list(run).write_text("[1, 2]"), "not an object", id="list not an object"),
    pytest.param(truncate, "a readable safetensors file", id="truncated file"),
    pytest.param(lambda run: shard_file(run).unlink(), "it is missing", id="missing file"),
    pytest.param(
        lambda run: (
            rewrite_shard(lambda t: {"rows": t["rows"][:9000], "sum": t["sum"][:9000]})(run)
            or set_sizes(rows=9000, count=9000)(run)
        ),
        f"expected shape ({ITEMS}, 16), got (9000, 16)",
        id="a whole table of another size",
    ),
]


@pytest.mark.parametrize("damage, message", DAMAGED)
def test_damaged_shard_files_are_refused_before_use(
    run: Path, damage: Callable[[Path], None], message: str
) -> None:
    damage(run)
    with pytest.raises(PoeemError) as err:
        load_run(run)
    assert message in str(err.value)


def test_a_damaged_run_is_one_clear_line_on_the_command_line(run: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    set_file("../../../etc/passwd")(run)
    command = [sys.executable, "-m", "poeem", "export", str(run), "--out", str(tmp_path / "ix")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(
        "error: sharded table 'item_tower', shard file: expected the name of a file inside"
    )
    assert not (tmp_path / "ix" / "manifest.json").exists()


def test_table_shards_read_any_row_range_of_a_valid_table(run: Path) -> None:
    saved = TableShards(run / RUN_TABLES / TAG, "item_tower")
    rows, sums = saved.read(0, ITEMS)
    part = saved.read(10, 5)
    assert torch.equal(part[0], rows[10:15]) and torch.equal(part[1], sums[10:15])


# --------------------------------------------------------------- index folders
@pytest.fixture()
def index(tmp_path: Path) -> Path:
    import numpy as np
    from conftest import make_dir

    searcher, _, x = make_dir(tmp_path)
    searcher.add(x[1000:1010].numpy(), np.arange(5000, 5010))  # a segment
    return tmp_path / "ix"


def test_an_index_file_named_outside_the_folder_is_refused(index: Path) -> None:
    from poeem import Searcher

    manifest = json.loads((index / "manifest.json").read_text())
    (role,) = [r for r in manifest["files"] if r.startswith("segment")]
    for name in ("../other/segment-2.safetensors", "/etc/passwd", ".."):
        edited = {**manifest, "files": {**manifest["files"], role: name}}
        (index / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(PoeemError, match="index manifest field 'files': expected plain file names"):
            Searcher.load(index)
    (index / "manifest.json").write_text(json.dumps(manifest))
    segment = index / manifest["files"][role]
    outside = index.parent / "elsewhere.safetensors"
    segment.rename(outside)
    segment.symlink_to(outside)  # the same bytes, the same checksum, but outside the folder
    with pytest.raises(PoeemError, match=r"expected the name of a file inside .* leads to '.*elsewhere"):
        Searcher.load(index)
