"""Sparse id-table optimizers: row-wise Adagrad, SparseAdam, the split optimizer, and bfloat16
tables."""

from pathlib import Path

import pytest
import torch
from torch import nn

from poeem import PoeemError
from poeem.model import ModelConfig, TwoTowerModel
from poeem.pipeline import RunConfig
from poeem.training import RowWiseAdagrad, TrainConfig, build_optimizer, load_checkpoint, save_checkpoint
from poeem.training.optimizers import stochastic_round


def table_steps(table: nn.Embedding, optimizer: torch.optim.Optimizer, batches: list[torch.Tensor]) -> None:
    for ids in batches:
        optimizer.zero_grad()
        (table(ids).pow(2).sum() + table(ids).sum()).backward()
        optimizer.step()


def id_batches(rows: int, steps: int = 5, size: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(rows, (size,), generator=g) for _ in range(steps)]  # repeats included


def test_rowwise_adagrad_on_one_column_tables_is_adagrad() -> None:
    torch.manual_seed(0)
    ours, ref = nn.Embedding(20, 1, sparse=True), nn.Embedding(20, 1, sparse=True)
    ref.load_state_dict(ours.state_dict())
    batches = id_batches(20)
    table_steps(ours, RowWiseAdagrad(ours.parameters(), lr=0.3, eps=1e-10), batches)
    table_steps(ref, torch.optim.Adagrad(ref.parameters(), lr=0.3, eps=1e-10), batches)
    torch.testing.assert_close(ours.weight, ref.weight)


def test_rowwise_adagrad_sparse_and_dense_gradients_agree_and_untouched_rows_stay() -> None:
    torch.manual_seed(0)
    sparse, dense = nn.Embedding(50, 8, sparse=True), nn.Embedding(50, 8)
    dense.load_state_dict(sparse.state_dict())
    before = sparse.weight.detach().clone()
    batches = id_batches(50)
    opt = RowWiseAdagrad(sparse.parameters(), lr=0.1, weight_decay=0.01)
    table_steps(sparse, opt, batches)
    table_steps(dense, RowWiseAdagrad(dense.parameters(), lr=0.1, weight_decay=0.01), batches)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=0, atol=1e-6)
    touched = torch.zeros(50, dtype=torch.bool)
    touched[torch.cat(batches)] = True
    assert torch.equal(sparse.weight[~touched], before[~touched])
    assert not torch.isclose(sparse.weight[touched], before[touched]).all(-1).any()
    state = opt.state[sparse.weight]["sum"]
    assert state.shape == (50,) and (state[~touched] == 0).all() and (state[touched] > 0).all()


def test_sparse_adam_equals_adam_when_every_row_is_touched() -> None:
    """SparseAdam is lazy Adam: with every row in every batch it is Adam."""
    torch.manual_seed(0)
    sparse, dense = nn.Embedding(6, 4, sparse=True), nn.Embedding(6, 4)
    dense.load_state_dict(sparse.state_dict())
    batches = [torch.randperm(6) for _ in range(5)]
    table_steps(sparse, torch.optim.SparseAdam(sparse.parameters(), lr=0.05), batches)
    table_steps(dense, torch.optim.Adam(dense.parameters(), lr=0.05), batches)
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=0, atol=1e-6)


def small_model() -> TwoTowerModel:
    torch.manual_seed(0)
    return TwoTowerModel(ModelConfig(dim=8, temperature=0.2), 30, 40)


def model_steps(model: TwoTowerModel, cfg: TrainConfig, steps: int = 4, dense_tables: bool = False) -> None:
    optimizer = build_optimizer(model, cfg)
    for table in model.id_tables():
        table.sparse = table.sparse and not dense_tables
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = {
            "query_ids": torch.randint(30, (16,), generator=g),
            "item_ids": torch.randint(40, (16,), generator=g),
        }
        optimizer.zero_grad(set_to_none=True)
        model(batch)["loss"].backward()
        optimizer.step()


def test_split_optimizer_gives_the_tables_sparse_gradients_and_the_rest_the_dense_optimizer() -> None:
    cfg = TrainConfig(lr=0.05, table_optimizer="rowwise_adagrad")
    model = small_model()
    optimizer = build_optimizer(model, cfg)
    assert all(t.sparse for t in model.id_tables()) and len(model.id_tables()) == 2
    assert len(optimizer.state_dict()["param_groups"]) == 2  # dense group + the tables' group
    # a model with the same tables trained by row-wise Adagrad on dense gradients lands at the same place
    sparse, reference = small_model(), small_model()
    model_steps(sparse, cfg)
    model_steps(reference, cfg, dense_tables=True)
    torch.testing.assert_close(sparse.state_dict(), reference.state_dict(), rtol=0, atol=1e-6)


def test_split_optimizer_state_round_trips() -> None:
    model = small_model()
    cfg = TrainConfig(lr=0.05, table_optimizer="sparse_adam")
    model_steps(model, cfg)
    first = build_optimizer(model, cfg)
    first.step()  # no gradients: state is created lazily, nothing moves
    other = build_optimizer(model, cfg)
    other.load_state_dict(first.state_dict())
    assert other.state_dict()["param_groups"] == first.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="no table optimizer"):
        other.load_state_dict(build_optimizer(small_model(), TrainConfig()).state_dict())


def test_bad_table_optimizer_settings_are_clear_errors() -> None:
    with pytest.raises(PoeemError, match="table_optimizer"):
        TrainConfig(table_optimizer="sgd")  # type: ignore[arg-type]
    with pytest.raises(PoeemError, match="table_lr"):
        TrainConfig(table_lr=0)
    with pytest.raises(PoeemError, match="has none"):
        build_optimizer(torch.nn.Linear(2, 2), TrainConfig(table_optimizer="rowwise_adagrad"))
    with pytest.raises(PoeemError, match="SparseAdam has none"):
        build_optimizer(small_model(), TrainConfig(table_optimizer="sparse_adam", weight_decay=0.1))


def test_resuming_with_another_table_optimizer_is_a_clear_error(tmp_path: Path) -> None:
    model = small_model()
    save_checkpoint(tmp_path / "c.safetensors", model, build_optimizer(model, TrainConfig()), {"step": 1})
    sparse = build_optimizer(model, TrainConfig(table_optimizer="rowwise_adagrad"))
    with pytest.raises(PoeemError, match="--table-optimizer"):
        load_checkpoint(tmp_path / "c.safetensors", model, sparse)


# ------------------------------------------------------------ bfloat16 tables


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour() -> None:
    x = torch.full((200_000,), 1.0 + 0.3 * 2**-7)  # 30% of the way from 1 to the next bfloat16
    rounded = stochastic_round(x, torch.bfloat16, seed=3)
    assert set(rounded.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert abs(float(rounded.float().mean()) - float(x[0])) < 2e-5  # nearest rounding: off by 0.0023
    negative = stochastic_round(-x, torch.bfloat16, seed=3)
    assert torch.equal(negative, -rounded)  # magnitudes round alike
    exact = torch.tensor([0.0, 1.0, -2.5, 2**-7])
    assert torch.equal(stochastic_round(exact, torch.bfloat16, seed=0).float(), exact)
    assert torch.equal(rounded, stochastic_round(x, torch.bfloat16, seed=3))
    assert not torch.equal(rounded, stochastic_round(x, torch.bfloat16, seed=4))


def test_bfloat16_table_follows_the_float32_one_where_rounding_to_nearest_would_stall() -> None:
    """Each update is ~1/8 of a bfloat16 step at 1.0: rounding to nearest would never move."""
    full = nn.Embedding(64, 8, sparse=True)
    nn.init.constant_(full.weight, 1.0)
    half = nn.Embedding(64, 8, sparse=True, dtype=torch.bfloat16)
    nn.init.constant_(half.weight, 1.0)
    batches = [torch.arange(64)] * 200
    for table in (full, half):
        opt = RowWiseAdagrad(table.parameters(), lr=1e-3)
        for ids in batches:
            opt.zero_grad()
            table(ids).float().sum().backward()  # constant gradient 1: lr / sqrt(step) per step
            opt.step()
        assert opt.state[table.weight]["sum"].dtype == torch.float32
    moved_full, moved_half = 1 - full.weight.detach(), 1 - half.weight.detach().float()
    assert float(moved_full.min()) > 0.02  # 1e-3 * sum(1/sqrt(t)), about 3.5 bfloat16 steps
    assert float((moved_half.mean() - moved_full.mean()).abs()) < 0.05 * float(moved_full.mean())


def test_bfloat16_table_state_round_trips_in_float32() -> None:
    model = TwoTowerModel(ModelConfig(dim=8, temperature=0.2, table_dtype="bfloat16"), 30, 40)
    assert all(t.weight.dtype == torch.bfloat16 for t in model.id_tables())
    cfg = TrainConfig(lr=0.05, table_optimizer="rowwise_adagrad")
    first = build_optimizer(model, cfg)
    model({"query_ids": torch.arange(16), "item_ids": torch.arange(16)})["loss"].backward()
    first.step()
    table = model.item_tower.embedding.weight
    first.table.state[table]["sum"] = torch.rand(40) * 1e-3  # not representable in bfloat16
    other = build_optimizer(model, cfg)
    other.load_state_dict(first.state_dict())
    assert other.table.state[table]["sum"].dtype == torch.float32
    assert torch.equal(other.table.state[table]["sum"], first.table.state[table]["sum"])
    assert other.table.state[table]["step"] == 1


def test_bfloat16_tables_need_rowwise_adagrad_and_id_towers() -> None:
    model = TwoTowerModel(ModelConfig(dim=8, table_dtype="bfloat16"), 30, 40)
    for name in ("dense", "sparse_adam"):
        with pytest.raises(PoeemError, match="'rowwise_adagrad' for bfloat16 id tables"):
            build_optimizer(model, TrainConfig(table_optimizer=name))  # type: ignore[arg-type]
    with pytest.raises(PoeemError, match="table_dtype"):
        ModelConfig(table_dtype="float16")  # type: ignore[arg-type]
    with pytest.raises(PoeemError, match="text towers"):
        ModelConfig(text={}, table_dtype="bfloat16")
    with pytest.raises(PoeemError, match="--table-optimizer rowwise_adagrad"):
        RunConfig(model=ModelConfig(table_dtype="bfloat16"))


def test_a_checkpoint_saved_before_the_lists_had_a_rate_of_their_own_resumes(tmp_path: Path) -> None:
    from poeem.training.checkpoint import read_checkpoint, restore_checkpoint

    torch.manual_seed(0)
    layer = {"num_coarse": 4, "num_subspaces": 4, "codebook_size": 16, "warmup_steps": 0, "buffer_size": 64}
    model = TwoTowerModel(ModelConfig(dim=16, poeem={**layer, "list_lr_scale": 0.5}), 50, 100)
    model.warm_start_on_catalogue()
    cfg = TrainConfig(lr=0.01)
    earlier = build_optimizer(model, cfg, scaled_groups=False)  # one group for the whole index
    batch = {"query_ids": torch.arange(32) % 50, "item_ids": torch.arange(32) * 3 % 100}
    for _ in range(2):
        earlier.zero_grad()
        model(batch)["loss"].backward()
        earlier.step()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, model, earlier, {"step": 2})
    now = build_optimizer(model, cfg)
    assert len(now.param_groups) == len(earlier.param_groups) + 1
    tensors, meta = read_checkpoint(path)
    with pytest.raises(PoeemError, match="optimizer"):
        restore_checkpoint(path, tensors, meta, model, now)  # without the earlier layout
    later = build_optimizer(model, cfg)
    restore_checkpoint(path, tensors, meta, model, later, earlier=lambda: build_optimizer(model, cfg, False))
    assert {id(p) for p in later.state} == {id(p) for p in earlier.state}
    for param, state in earlier.state.items():
        for key, value in state.items():
            torch.testing.assert_close(later.state[param][key], value)
    rates = {id(p): g["lr"] for g in later.param_groups for p in g["params"]}
    assert rates[id(model.index.coarse)] == pytest.approx(0.005)  # the new layout's rates stay
