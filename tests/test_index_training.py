"""The options that train the index for retrieval: routing, balance, re-seeding, task gradient."""

import faiss
import numpy as np
import pytest
import torch
from conftest import correlated
from faiss.contrib.inspect_tools import get_invlist

from poeem import PoeemLayer
from poeem.evaluation.cost import imbalance_factor
from poeem.export import to_faiss
from poeem.export.faiss_codec import pack_sa_codes
from poeem.model import ModelConfig, TwoTowerModel


def layer_on(x: torch.Tensor, **options: object) -> PoeemLayer:
    settings = {"num_subspaces": 4, "codebook_size": 16, "num_coarse": 4, "warmup_steps": 0}
    layer = PoeemLayer(dim=x.shape[1], buffer_size=len(x), kmeans_iters=5, **{**settings, **options})
    layer.initialize(x)
    return layer


def test_routing_loss_moves_the_positives_list_towards_the_query() -> None:
    x = torch.nn.functional.normalize(correlated(512, 16), dim=1)
    layer = layer_on(x, routing_weight=1.0, route_centroids=True, routing_lists="all")
    q = torch.nn.functional.normalize(torch.randn(1, 16), dim=1).requires_grad_(True)
    routed = int(layer.list_logits(q).argmax())
    target = torch.tensor([(routed + 1) % 4])  # its positive lives in another list
    before = layer.list_logits(q.detach())[0].detach()
    opt = torch.optim.SGD([*layer.parameters(), q], lr=0.05)
    layer.routing_loss(q, target).backward()
    assert q.grad.abs().sum() > 0  # the query tower learns to route
    opt.step()
    after = layer.list_logits(q.detach())[0].detach()
    gain = after - before
    assert gain[target] > 0 and gain[target] == gain.max()  # the target list gained the most
    assert gain[routed] < 0


def test_routing_loss_moves_only_the_queries_by_default() -> None:
    x = correlated(512, 16)
    layer = layer_on(x, routing_weight=1.0, rotation="givens")
    q = torch.randn(8, 16, requires_grad=True)
    layer.routing_loss(q, torch.zeros(8, dtype=torch.long)).backward()
    assert layer.coarse.grad is None and layer.givens.angles.grad is None  # item codes stay put
    assert q.grad.abs().sum() > 0


def routing_grads(layer: PoeemLayer, q: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The routing loss, and its gradients to the queries and the centroids."""
    layer.zero_grad()
    q = q.clone().requires_grad_(True)
    loss = layer.routing_loss(q, targets)
    loss.backward()
    return loss.detach(), q.grad, layer.coarse.grad.clone()


def test_routing_over_the_batch_lists_is_the_full_softmax_when_the_batch_covers_every_list() -> None:
    layer = layer_on(correlated(512, 16), num_coarse=8, route_centroids=True)
    q, targets = torch.randn(12, 16), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 7, 2, 0, 5])
    layer.config.routing_lists = "all"
    full = routing_grads(layer, q, targets)
    layer.config.routing_lists = "batch"
    for ours, reference in zip(routing_grads(layer, q, targets), full, strict=True):
        torch.testing.assert_close(ours, reference)


def test_routing_samples_the_batch_lists_when_the_index_has_more_lists_than_the_batch_rows() -> None:
    layer = layer_on(correlated(512, 16), num_coarse=8, route_centroids=True)  # routing_lists "auto"
    q, targets = torch.randn(5, 16), torch.tensor([6, 1, 6, 3, 1])  # 8 lists > 5 rows
    loss, _, coarse_grad = routing_grads(layer, q, targets)
    lists = torch.tensor([1, 3, 6])
    logits = layer.list_logits(q)[:, lists]  # the full logits, restricted to the batch's lists
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([2, 0, 2, 1, 0]))
    torch.testing.assert_close(loss, expected.detach())
    others = torch.ones(8, dtype=torch.bool)
    others[lists] = False
    assert (coarse_grad[others] == 0).all() and (coarse_grad[lists] != 0).any(1).all()
    layer.config.routing_lists = "all"
    assert not torch.allclose(routing_grads(layer, q, targets)[0], loss)


def test_balance_lowers_the_imbalance_factor_on_skewed_data() -> None:
    g = torch.Generator().manual_seed(0)
    crowd = torch.randn(900, 16, generator=g) * 0.3 + 1.0  # most items in one corner
    x = torch.nn.functional.normalize(torch.cat([crowd, torch.randn(300, 16, generator=g)]), dim=1)
    layer = layer_on(x, balance_weight=1.0)  # inner-product lists, regularizer on

    def imbalance() -> float:
        return imbalance_factor(np.bincount(layer.encode(x)[0].long().numpy(), minlength=4))

    before = imbalance()
    opt = torch.optim.Adam([layer.coarse], lr=0.01)
    for _ in range(200):
        opt.zero_grad()
        layer(x).loss.backward()
        opt.step()
    assert before > 2 and imbalance() < 1.1


def test_a_dead_codeword_is_reseeded_and_then_used() -> None:
    x = correlated(512, 16)
    layer = layer_on(x, reseed_after=5)
    with torch.no_grad():
        layer.codebooks[1, 3] = 1e3  # nothing is near it: it codes no item
    for _ in range(5):
        layer(x[:256])
    assert layer.codebooks[1, 3].abs().max() < 100  # moved onto an item's residual
    assert (layer.encode(x[:256])[1][:, 1] == 3).any()


def test_a_dead_list_is_reseeded_on_an_item() -> None:
    x = correlated(512, 16)
    layer = layer_on(x, reseed_after=3)
    with torch.no_grad():
        layer.coarse[2] = -50 * layer.coarse[0]  # a list nobody picks
    for _ in range(3):
        layer(x[:256])
    assert (layer.encode(x)[0] == 2).any()


def test_task_gradient_reaches_the_index_and_items_keep_the_identity() -> None:
    x = correlated(512, 16)
    layer = layer_on(x, index_task_grad=True, regularizer_weight=0.0)
    xb = x[:64].clone().requires_grad_(True)
    out = layer(xb)
    upstream = torch.randn_like(xb)
    (out.output * upstream).sum().backward()
    torch.testing.assert_close(xb.grad, upstream)
    assert layer.codebooks.grad.abs().sum() > 0 and layer.coarse.grad.abs().sum() > 0
    torch.testing.assert_close(out.output, layer.decode(out.coarse_codes, out.codes), rtol=0, atol=0)


def test_a_model_trained_with_every_option_exports_its_codes_bit_for_bit() -> None:
    options = {
        "num_subspaces": 4,
        "codebook_size": 16,
        "num_coarse": 4,
        "warmup_steps": 2,
        "buffer_size": 64,
        "kmeans_iters": 3,
        "routing_weight": 1.0,
        "route_centroids": True,
        "index_task_grad": True,
        "balance_weight": 1.0,
        "reseed_after": 3,
        "unquantized_loss_weight": 1.0,
    }
    model = TwoTowerModel(ModelConfig(dim=16, poeem=options), 50, 80)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        batch = {
            "query_ids": torch.randint(50, (32,), generator=g),
            "item_ids": torch.randint(80, (32,), generator=g),
        }
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert out["routing_loss"] > 0  # the last steps quantized and routed
    model.eval()
    x = model.all_item_embeddings()
    index = to_faiss(model.index, x, metric="cosine")
    coarse_codes, codes = model.index.encode(x)
    expected = pack_sa_codes(None, codes.numpy(), 0, 4)
    ivf = faiss.extract_index_ivf(index)
    for lst in range(ivf.nlist):
        ids, stored = get_invlist(ivf.invlists, lst)
        assert (coarse_codes.numpy()[ids] == lst).all()
        assert np.array_equal(stored, expected[ids])


def test_checkpoints_without_usage_buffers_still_load() -> None:
    x = correlated(512, 16)
    layer = layer_on(x, reseed_after=10)
    state = {k: v for k, v in layer.state_dict().items() if not k.endswith("_last_used")}
    fresh = PoeemLayer(layer.config)
    fresh.load_state_dict(state)
    assert (fresh.codeword_last_used == int(layer.step)).all()
    torch.testing.assert_close(fresh.encode(x)[1], layer.encode(x)[1])


def test_task_items_alternate_between_the_two_terms_and_eval_scores_both() -> None:
    x = correlated(256, 16)
    layer = layer_on(x, unquantized_loss_weight=0.5, reseed_after=0)
    xb = x[:32]
    picked = []
    for _ in range(4):
        out = layer(xb)
        [(weight, items)] = layer.task_items(xb, out)
        picked.append((weight, items is xb))
    assert sorted(picked[:2]) == [(1.0, True), (2.0, False)]  # 2 x 0.5 on x, then 2 x 1 on x_hat
    assert picked[2:] == picked[:2]  # in turn
    layer.eval()
    out = layer(xb)
    assert [(w, items is xb) for w, items in layer.task_items(xb, out)] == [(1.0, False), (0.5, True)]
    every = layer_on(x, unquantized_schedule="every_step")
    assert len(every.task_items(xb, every(xb))) == 2
    warming = PoeemLayer(dim=16, num_subspaces=4, codebook_size=16, num_coarse=4, warmup_steps=5)
    out = warming(xb)
    assert warming.task_items(xb, out) == [(1.0, out.output)]  # the identity before k-means
    off = layer_on(x, unquantized_loss_weight=0.0)
    out = off(xb)
    assert off.task_items(xb, out) == [(1.0, out.output)]


def test_alternating_steps_average_to_the_every_step_loss() -> None:
    torch.manual_seed(0)
    options = {"num_subspaces": 4, "codebook_size": 16, "num_coarse": 4, "warmup_steps": 0}
    options.update(buffer_size=80, kmeans_iters=3, reseed_after=0, routing_weight=0.0)
    model = TwoTowerModel(ModelConfig(dim=16, poeem=options), 50, 80)
    model.index.initialize(model.all_item_embeddings())
    batch = {"query_ids": torch.randint(50, (32,)), "item_ids": torch.randint(80, (32,))}
    alternating = [model(batch)["task_loss"] for _ in range(2)]  # no update between the steps
    assert not torch.isclose(alternating[0], alternating[1])  # each step scored one set of items
    model.index.config.unquantized_schedule = "every_step"
    torch.testing.assert_close((alternating[0] + alternating[1]) / 2, model(batch)["task_loss"])


# ------------------------------------------------------------------ the warm start's sample
def _popular_item_batches() -> list[torch.Tensor]:
    """64-row batches of 400 items in which item 0 fills half of every batch."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(8):
        ids = torch.randint(400, (64,), generator=g)
        ids[:32] = 0
        batches.append(ids)
    return batches


@pytest.mark.parametrize(("sample", "embedder"), [("items", True), ("items", False), ("batches", False)])
def test_the_warm_start_fits_each_item_once(sample: str, embedder: bool) -> None:
    from poeem.index.kmeans import kmeans, nearest_centroid

    items = torch.randn(400, 16, generator=torch.Generator().manual_seed(0))
    layer = PoeemLayer(
        dim=16,
        num_coarse=16,
        num_subspaces=4,
        codebook_size=16,
        warmup_steps=1,
        buffer_size=256,
        num_items=400,
        warm_start_sample=sample,
        coarse_metric="l2",
        kmeans_iters=10,
    )
    if embedder:  # a model that embeds any item: a uniform sample of the catalogue
        layer.item_embedder = lambda ids: items[ids]
    fitted = []
    layer.initialize = lambda x, progress=False: (fitted.append(x.clone()), PoeemLayer.initialize(layer, x))[
        1
    ]
    for ids in _popular_item_batches():
        layer(items[ids], ids)
    assert layer.is_initialized and len(fitted) == 1
    distinct = fitted[0].unique(dim=0).shape[0]
    if sample == "batches":  # the paper's warm start: item 0 holds half the rows k-means sees
        assert distinct < fitted[0].shape[0] // 2
        return
    assert distinct == fitted[0].shape[0]  # each item once
    if embedder:
        assert fitted[0].shape[0] == 256  # buffer_size items, drawn from the whole catalogue
    reference = kmeans(items, 16, iters=10, seed=0)  # k-means on the unique items
    largest = int(torch.bincount(nearest_centroid(items[None], reference[None])[0][0]).max())
    lists = torch.bincount(layer.encode(items)[0].long(), minlength=16)
    assert int(lists.max()) <= 1.25 * largest


def test_frozen_lists_stay_where_the_warm_start_put_them_and_slow_ones_train_slowly() -> None:
    from poeem.training import TrainConfig
    from poeem.training.optimizers import build_optimizer

    def model_with(scale: float) -> TwoTowerModel:
        torch.manual_seed(0)
        layer = {
            "num_coarse": 4,
            "num_subspaces": 4,
            "codebook_size": 16,
            "warmup_steps": 0,
            "buffer_size": 64,
            "kmeans_iters": 2,
            "list_lr_scale": scale,
        }
        model = TwoTowerModel(ModelConfig(dim=16, poeem=layer), 50, 100)
        model.warm_start_on_catalogue()
        return model

    batch = {"query_ids": torch.arange(32) % 50, "item_ids": torch.arange(32) * 3 % 100}
    moved = {}
    for scale in (0.0, 0.1, 1.0):
        model = model_with(scale)
        opt = build_optimizer(model, TrainConfig(lr=0.01, index_lr=0.02))
        lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lrs[id(model.index.codebooks)] == pytest.approx(0.02)
        model(batch)  # the warm start fits the catalogue
        start = model.index.coarse.detach().clone()
        for _ in range(3):
            opt.zero_grad()
            model(batch)["loss"].backward()
            opt.step()
        if scale == 0:
            assert model.index.coarse.grad is None and torch.equal(model.index.coarse.detach(), start)
        else:
            assert lrs[id(model.index.coarse)] == pytest.approx(0.02 * scale)
        moved[scale] = float((model.index.coarse.detach() - start).abs().max())
    assert 0 == moved[0.0] < moved[0.1] < moved[1.0]


def test_small_lists_train_slowly_large_ones_at_the_index_rate() -> None:
    from poeem.index import PoeemConfig

    def share(num_items: int, num_coarse: int, **given: float) -> float:
        return PoeemConfig(
            dim=16, num_subspaces=4, num_items=num_items, num_coarse=num_coarse, **given
        ).list_lr_share

    assert share(1682, 128) == pytest.approx(1682 / 128 / 1024)  # 13 items a list
    assert share(10_000, 8) == share(0, 8) == share(100, 0) == 1.0  # large lists; unknown sizes
    assert share(1682, 128, list_lr_scale=0.5) == 0.5  # given, it is kept


def test_a_uniform_sample_is_distinct_reproducible_and_bounded() -> None:
    from poeem.index.layer import uniform_sample

    for n, m in ((10, 10), (1000, 300), (10**9, 1000)):
        a = uniform_sample(n, m, torch.Generator().manual_seed(3))
        b = uniform_sample(n, m, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == (m,) and a.unique().shape == (m,)
        assert int(a.min()) >= 0 and int(a.max()) < n
