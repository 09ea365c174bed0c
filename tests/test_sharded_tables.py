"""The TorchRec path: the two-tower model's item table sharded row-wise over 2 gloo ranks trains
like one local table under row-wise Adagrad on the global batch. Skipped without torchrec."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_ranks

from poeem.model import ModelConfig, TwoTowerModel
from poeem.model.sharded_tables import torchrec_available
from poeem.training import RowWiseAdagrad

pytestmark = pytest.mark.skipif(not torchrec_available(), reason="torchrec extra not installed")

BATCH, STEPS, LR = 32, 3, 0.1
INIT_ROWS = 70_000  # more than one seeded block (INIT_BLOCK), split between the ranks


def tiny_model() -> TwoTowerModel:
    torch.manual_seed(0)
    return TwoTowerModel(ModelConfig(dim=8, temperature=0.2, cross_rank_negatives=True), 20, 101)


def global_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        {
            "query_ids": torch.randint(20, (BATCH,), generator=g),
            "item_ids": torch.randint(101, (BATCH,), generator=g),
        }
        for _ in range(STEPS)
    ]


def sharded_worker(out: str) -> None:
    from poeem import distributed
    from poeem.model.sharded_tables import ShardedIdTable, TableShards, save_table_shards

    model = tiny_model()
    local = model.item_tower.embedding
    table = ShardedIdTable(101, 8, lr=LR, init=local.weight.detach())
    model.query_tower.requires_grad_(False)
    share = distributed.shard(BATCH)
    probe = torch.tensor([0, 50, 100, 7])
    torch.testing.assert_close(table(probe), local(probe), rtol=0, atol=0)
    model.item_tower.embedding = table  # the tower now looks ids up through TorchRec
    for batch in global_batches():
        model({k: v[share] for k, v in batch.items()})["loss"].backward()  # the fused step runs here
    first, rows = table.local_rows()
    drawn = ShardedIdTable(INIT_ROWS, 4, lr=LR, init_std=0.5, seed=7).local_rows()  # its own rows only
    # saved by each rank, loaded into a fresh table: the next step is the same as without the stop
    save_table_shards(table, f"{out}/tables", "item")
    _, _, sums = table.local_state()
    resumed = ShardedIdTable(101, 8, lr=LR, seed=1)
    resumed.load_shards(TableShards(f"{out}/tables", "item"))
    loaded = resumed.local_state()
    last = global_batches()[0]
    after = []
    for t in (table, resumed):
        model.item_tower.embedding = t
        model({k: v[share] for k, v in last.items()})["loss"].backward()
        after.append(t.local_state())
    torch.save(
        {"first": first, "rows": rows, "sums": sums, "drawn": drawn, "loaded": loaded, "after": after}
        | {"tables": f"{out}/tables"},
        f"{out}/rank{dist.get_rank()}.pt",
    )


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of the 2 ranks of :func:`sharded_worker` saved (spawned once for the module)."""
    out = tmp_path_factory.mktemp("ranks")
    run_ranks(sharded_worker, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_sharded_item_table_trains_like_a_local_table(rank_outputs: list[dict]) -> None:
    parts = sorted(rank_outputs, key=lambda p: p["first"])
    assert [p["first"] for p in parts] == [0, parts[0]["rows"].shape[0]]  # each rank owns a row range
    sharded = torch.cat([p["rows"] for p in parts])

    model = tiny_model()
    before = model.item_tower.embedding.weight.detach().clone()
    model.item_tower.embedding.sparse = True
    optimizer = RowWiseAdagrad(model.item_tower.embedding.parameters(), lr=LR, eps=1e-8)
    model.query_tower.requires_grad_(False)
    for batch in global_batches():
        optimizer.zero_grad()
        model(batch)["loss"].backward()
        optimizer.step()
    expected = model.item_tower.embedding.weight.detach()
    assert not torch.equal(expected, before)
    # ranks sum their gradients where one process averages: row-wise Adagrad is scale-free
    torch.testing.assert_close(sharded, expected, rtol=0, atol=1e-5)


def test_ranks_draw_their_own_rows_of_one_seeded_table(rank_outputs: list[dict]) -> None:
    from poeem.model.sharded_tables import seeded_rows

    parts = sorted((r["drawn"] for r in rank_outputs), key=lambda p: p[0])
    assert parts[0][0] == 0 and parts[1][0] == parts[0][1].shape[0]  # a row range each
    whole = seeded_rows(0, INIT_ROWS, 4, 0.5, seed=7)  # one process draws the whole table alike
    assert torch.equal(torch.cat([rows for _, rows in parts]), whole)
    assert torch.equal(seeded_rows(65_000, 2_000, 4, 0.5, seed=7), whole[65_000:67_000])  # across blocks
    assert 0.45 < float(whole.std()) < 0.55 and not torch.equal(whole, seeded_rows(0, INIT_ROWS, 4, 0.5, 8))


def test_a_sharded_table_is_saved_by_each_rank_and_resumes_exactly(rank_outputs: list[dict]) -> None:
    from poeem.model.sharded_tables import TableShards

    parts = sorted(rank_outputs, key=lambda p: p["first"])
    saved = TableShards(parts[0]["tables"], "item")  # one process reads the whole table back
    rows, sums = saved.read(0, 101)
    assert torch.equal(rows, torch.cat([p["rows"] for p in parts]))
    assert torch.equal(sums, torch.cat([p["sums"] for p in parts]))
    middle = saved.read(40, 30)  # a range across the two ranks' files
    assert torch.equal(middle[0], rows[40:70]) and torch.equal(middle[1], sums[40:70])
    assert len(list(Path(parts[0]["tables"]).glob("item-*.safetensors"))) == 2  # one file per rank
    for part in rank_outputs:
        first, rows, sums = part["loaded"]
        assert first == part["first"] and torch.equal(rows, part["rows"]) and torch.equal(sums, part["sums"])
        assert float(part["sums"].sum()) > 0  # the Adagrad state came along, not zeros
        (_, cont_rows, cont_sums), (_, res_rows, res_sums) = part["after"]
        assert torch.equal(cont_rows, res_rows) and torch.equal(cont_sums, res_sums)
        assert not torch.equal(cont_rows, part["rows"])  # the step after the load did train


def three_rank_worker(tables: str, out: str) -> None:
    from poeem.model.sharded_tables import ShardedIdTable, TableShards

    table = ShardedIdTable(101, 8, lr=LR, seed=2)
    table.load_shards(TableShards(tables, "item"))  # saved by 2 ranks, read by 3
    torch.save(table.local_state(), f"{out}/three{dist.get_rank()}.pt")


def test_a_table_saved_by_two_ranks_loads_on_three(rank_outputs: list[dict], tmp_path: Path) -> None:
    parts = sorted(rank_outputs, key=lambda p: p["first"])
    run_ranks(three_rank_worker, parts[0]["tables"], str(tmp_path), world=3)
    loaded = sorted((torch.load(tmp_path / f"three{r}.pt") for r in range(3)), key=lambda s: s[0])
    assert len({first for first, _, _ in loaded}) == 3  # three row ranges
    assert torch.equal(torch.cat([rows for _, rows, _ in loaded]), torch.cat([p["rows"] for p in parts]))
    assert torch.equal(torch.cat([sums for _, _, sums in loaded]), torch.cat([p["sums"] for p in parts]))
