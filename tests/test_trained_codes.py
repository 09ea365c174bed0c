"""The codes training computed for each item (the index as trained), and the export that takes them."""

from pathlib import Path

import pytest
import torch
from conftest import correlated, tiny_config

from poeem import PoeemConfig, PoeemLayer
from poeem.errors import PoeemError
from poeem.export.item_codes import item_codes
from poeem.metric import prepare_queries
from poeem.model import ModelConfig, TwoTowerModel


def remembering_layer(x: torch.Tensor, num_items: int, **options: object) -> PoeemLayer:
    settings = {
        "num_subspaces": 4,
        "codebook_size": 16,
        "num_coarse": 4,
        "warmup_steps": 0,
        "reseed_after": 0,
    }
    layer = PoeemLayer(
        dim=x.shape[1], buffer_size=len(x), kmeans_iters=5, num_items=num_items, **{**settings, **options}
    )
    layer.initialize(x)
    return layer


def test_a_training_step_remembers_the_codes_it_computed() -> None:
    x = correlated(512, 16)
    layer = remembering_layer(x, num_items=1000)
    ids = torch.randperm(1000)[:512]
    out = layer(x, ids)
    memory = layer.trained
    assert memory is not None and int(memory.seen().sum()) == 512
    assert torch.equal(memory.codes[ids].long(), out.codes) and torch.equal(
        memory.coarse_codes[ids].long(), out.coarse_codes
    )
    coarse, codes = layer.encode(x)  # the same parameters: the codes a fresh encoding gives
    assert torch.equal(memory.codes[ids], codes) and torch.equal(
        memory.coarse_codes[ids].long(), coarse.long()
    )
    assert torch.equal(memory.step[ids], torch.full((512,), int(layer.step), dtype=torch.int32))
    layer.eval()
    layer(correlated(8, 16), torch.arange(8))  # evaluation steps remember nothing
    assert int(memory.seen().sum()) == 512


def test_refitting_or_reseeding_forgets_the_codes_that_moved() -> None:
    x = correlated(512, 16)
    layer = remembering_layer(x, num_items=512, reseed_after=3)
    layer(x, torch.arange(512))
    memory = layer.trained
    assert memory is not None and bool(memory.seen().all())
    with torch.no_grad():
        layer.codebooks[1, 3] = 1e3  # nothing is near it any more
    used = memory.codes[:, 1] == 3
    assert used.any()
    for _ in range(5):  # unused for 3 steps at a step divisible by 3: re-seeded at step 6
        layer(x[:256], torch.arange(256, 512))
    assert layer.codebooks[1, 3].abs().max() < 100
    seen = memory.seen()
    assert not seen[:256][used[:256]].any()  # coded with the moved codeword, never re-coded
    assert seen[256:].all() and seen[:256][~used[:256]].any()
    layer.initialize(x)
    assert not memory.seen().any()


@pytest.mark.parametrize("ids", [torch.tensor([0, 1, 1000]), torch.tensor([-1, 0, 1]), torch.zeros(3, 2)])
def test_ids_out_of_range_or_of_the_wrong_shape_are_a_clear_error(ids: torch.Tensor) -> None:
    x = correlated(512, 16)
    layer = remembering_layer(x, num_items=1000)
    with pytest.raises(PoeemError, match="PoeemLayer item ids"):
        layer(x[:3], ids.long())


def test_a_layer_saved_without_trained_codes_loads_with_none() -> None:
    x = correlated(512, 16)
    layer = remembering_layer(x, num_items=100)
    layer(x[:100], torch.arange(100))
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("trained.")}
    fresh = PoeemLayer(layer.config)
    fresh.load_state_dict(state)
    assert fresh.trained is not None and not fresh.trained.seen().any()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.trained.seen().all()


def test_export_takes_the_trained_codes_and_encodes_only_the_items_never_coded() -> None:
    torch.manual_seed(0)
    layer = {"num_subspaces": 4, "codebook_size": 16, "num_coarse": 4, "warmup_steps": 0, "buffer_size": 64}
    model = TwoTowerModel(ModelConfig(dim=16, poeem=layer), num_queries=50, num_items=300)
    model.train()
    seen = torch.arange(0, 300, 2)
    batch = {"query_ids": torch.randint(50, (150,)), "item_ids": seen}
    model(batch)  # fills the buffer and fits the index
    model(batch)  # a quantized step: codes of the even items
    with torch.no_grad():  # the items move after their step: the trained codes are not a re-encoding
        model.item_tower.embedding.weight.mul_(1.5).add_(0.3)
    model.eval()
    memory = model.index.trained
    coarse, codes = item_codes(model, chunk=64, from_training="codes")
    fresh_coarse, fresh = item_codes(model, chunk=64)
    odd = torch.arange(1, 300, 2)
    assert torch.equal(codes[seen], memory.codes[seen]) and torch.equal(
        coarse[seen].long(), memory.coarse_codes[seen].long()
    )
    assert torch.equal(codes[odd], fresh[odd]) and torch.equal(coarse[odd], fresh_coarse[odd])
    assert not torch.equal(codes[seen], fresh[seen])  # the memory, not a re-encoding

    lists, sub = item_codes(model, chunk=64, from_training="lists")
    assert torch.equal(lists[seen].long(), memory.coarse_codes[seen].long())
    assert torch.equal(lists[odd], fresh_coarse[odd]) and torch.equal(sub[odd], fresh[odd])
    assert not torch.equal(lists, fresh_coarse)  # some items moved to another list since their step
    # the seen items' sub-codes: the nearest codewords (brute force) to the residual of the kept list
    layer = model.index
    with torch.no_grad():
        x = prepare_queries(model.all_item_embeddings(), model.config.search_metric, 16, "items")
        xr = x @ layer.rotation_matrix
        residual = (xr - layer.coarse[lists.long()]).reshape(300, 4, 4)
        distances = ((residual[:, :, None, :] - layer.codebooks[None]) ** 2).sum(-1)  # (n, D, K)
    assert torch.equal(sub.long(), distances.argmin(-1))


def test_encoding_with_given_lists_checks_them() -> None:
    torch.manual_seed(0)
    layer = PoeemLayer(PoeemConfig(dim=8, num_subspaces=2, codebook_size=4, num_coarse=3))
    x = torch.randn(40, 8)
    layer.initialize(x)
    coarse, codes = layer.encode(x)
    assert torch.equal(layer.encode(x, lists=coarse)[1], codes)  # its own lists: the same codes
    for bad, match in (
        (coarse[:5], "shape"),
        (coarse.float(), "integer"),
        (torch.full((40,), 3), r"in \[0, 3\)"),
        (torch.full((40,), -1), r"in \[0, 3\)"),
    ):
        with pytest.raises(PoeemError, match=match):
            layer.encode(x, lists=bad)
    flat = PoeemLayer(PoeemConfig(dim=8, num_subspaces=2, codebook_size=4, num_coarse=0))
    flat.initialize(x)
    with pytest.raises(PoeemError, match="num_coarse 0"):
        flat.encode(x, lists=coarse)


def test_the_model_sets_num_items_and_refuses_another_size() -> None:
    layer = {"num_subspaces": 4, "codebook_size": 16, "num_coarse": 4}
    model = TwoTowerModel(ModelConfig(dim=16, poeem=layer), num_queries=5, num_items=300)
    assert model.index.config.num_items == 300
    off = TwoTowerModel(ModelConfig(dim=16, poeem={**layer, "num_items": 0}), num_queries=5, num_items=300)
    assert off.index.trained is None
    with pytest.raises(PoeemError, match="num_items"):
        TwoTowerModel(ModelConfig(dim=16, poeem={**layer, "num_items": 30}), num_queries=5, num_items=300)


def test_exporting_trained_codes_of_a_run_without_any_warns_and_encodes(tmp_path: Path) -> None:
    from poeem.pipeline import export_run, train_run
    from poeem.pipeline.recipe import IndexRecipe

    cfg = tiny_config()
    cfg.model.poeem["num_items"] = 0  # like a run trained before the layer kept its codes
    train_run(cfg, tmp_path / "run")
    codes_as_trained = IndexRecipe(from_training="codes")
    with pytest.warns(UserWarning, match="holds no codes from training"):
        as_trained = export_run(tmp_path / "run", tmp_path / "trained", recipe=codes_as_trained)
    encoded = export_run(tmp_path / "run", tmp_path / "encoded")
    assert torch.equal(as_trained.tensors.codes, encoded.tensors.codes)


@pytest.mark.parametrize("num_coarse", [0, 4])
def test_codes_a_distillation_kept_are_exported_as_they_are_until_the_layer_trains(num_coarse: int) -> None:
    from poeem.training.distill import DistillConfig, distill_index

    torch.manual_seed(0)
    layer = {"num_subspaces": 4, "codebook_size": 16, "num_coarse": num_coarse, "warmup_steps": 0}
    model = TwoTowerModel(
        ModelConfig(dim=16, poeem={**layer, "buffer_size": 64}), num_queries=50, num_items=300
    )
    model.train()
    model({"query_ids": torch.randint(50, (300,)), "item_ids": torch.arange(300)})  # fits the index
    model.eval()
    with torch.no_grad():
        items = prepare_queries(model.all_item_embeddings(), model.config.search_metric, 16, "items")
        queries = prepare_queries(model.query_tower.embedding.weight, "cosine", 16, "queries")
    config = DistillConfig(rounds=1, epochs=2, teacher_k=20, reassign=False, patience=None)
    result = distill_index(model.index, items, queries, config)
    assert bool(model.index.trained.distilled().all())
    _, fresh = item_codes(model, chunk=64)  # a re-encoding with the distilled codewords
    assert not torch.equal(fresh, result.codes.long())  # the frozen codes are not a re-encoding
    for mode in ("lists", "codes"):
        coarse, codes = item_codes(model, chunk=64, from_training=mode)
        assert torch.equal(codes.long(), result.codes.long())
        if num_coarse:
            assert torch.equal(coarse.long(), result.coarse_codes.long())
    model.train()  # training moves the codewords: the distilled codes no longer hold
    assert not bool(model.index.trained.seen().any())
