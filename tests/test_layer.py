import pytest
import torch
from conftest import correlated

from poeem import PoeemLayer
from poeem.errors import PoeemError
from poeem.index.quantize import coarse_assign, pq_assign, split_subvectors


def ready_layer(
    rotation: str = "none", num_coarse: int = 4, k: int = 16, dim: int = 16, d: int = 4
) -> tuple[PoeemLayer, torch.Tensor]:
    x = correlated(1024, dim)
    layer = PoeemLayer(
        coarse_metric="l2",  # the brute-force checks below use nearest-centroid lists
        dim=dim,
        num_subspaces=d,
        codebook_size=k,
        num_coarse=num_coarse,
        rotation=rotation,
        warmup_steps=0,
        buffer_size=512,
        kmeans_iters=5,
        opq_rounds=2,
    )
    layer.initialize(x[:512])
    return layer, x


@pytest.mark.parametrize("rotation", ["none", "opq", "givens", "cayley"])
def test_straight_through_gradient_is_identity(rotation: str) -> None:
    layer, x = ready_layer(rotation)
    x = x[:64].clone().requires_grad_(True)
    out = layer(x)
    assert out.quantized
    upstream = torch.randn_like(x)
    (out.output * upstream).sum().backward()
    torch.testing.assert_close(x.grad, upstream)


@pytest.mark.parametrize("rotation", ["none", "givens", "cayley"])
def test_index_params_get_gradient_only_from_regularizer(rotation: str) -> None:
    layer, x = ready_layer(rotation)
    out = layer(x[:64].clone().requires_grad_(True))
    out.output.pow(2).sum().backward(retain_graph=True)
    for p in layer.parameters():
        assert p.grad is None or not p.grad.any()
    out.loss.backward()
    assert layer.codebooks.grad.abs().sum() > 0
    assert layer.coarse.grad.abs().sum() > 0
    if layer.learned_rotation is not None:
        assert next(layer.learned_rotation.parameters()).grad.abs().sum() > 0


@pytest.mark.parametrize("num_coarse", [0, 4])
@pytest.mark.parametrize("rotation", ["none", "opq"])
def test_encode_matches_brute_force(num_coarse: int, rotation: str) -> None:
    layer, x = ready_layer(rotation, num_coarse=num_coarse)
    coarse_codes, codes = layer.encode(x, batch_size=100)
    assert codes.dtype == torch.uint8
    xr = x @ layer.rotation_matrix
    if num_coarse:
        expected_cc = torch.cdist(xr, layer.coarse).argmin(1)
        assert torch.equal(coarse_codes.long(), expected_cc)
        xr = xr - layer.coarse[expected_cc]
    else:
        assert coarse_codes is None
    sub = split_subvectors(xr, 4)  # (D, n, dsub)
    for d in range(4):
        expected = torch.cdist(sub[d], layer.codebooks[d].detach()).argmin(1)
        assert torch.equal(codes[:, d].long(), expected)


@pytest.mark.parametrize("rotation", ["none", "opq", "givens"])
def test_decode_of_encode_equals_forward(rotation: str) -> None:
    layer, x = ready_layer(rotation)
    layer.eval()
    out = layer(x)
    recon = layer.decode(*layer.encode(x))
    torch.testing.assert_close(recon, out.output, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.encode(x)[1].long(), out.codes)


def test_codes_use_uint16_for_large_k() -> None:
    layer = PoeemLayer(
        dim=4,
        num_subspaces=2,
        codebook_size=512,
        num_coarse=0,
        buffer_size=512,
        warmup_steps=0,
        kmeans_iters=1,
    )
    layer.initialize(torch.randn(512, 4))
    _, codes = layer.encode(torch.randn(10, 4))
    assert codes.dtype == torch.uint16


@pytest.mark.parametrize("rotation", ["givens", "cayley"])
def test_learned_rotation_stays_orthogonal_under_large_steps(rotation: str) -> None:
    layer, x = ready_layer(rotation)
    opt = torch.optim.Adam(layer.parameters(), lr=0.5)  # parameters move up to 0.5 a step
    for i in range(200):
        out = layer(x[(i % 8) * 64 : (i % 8 + 1) * 64])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    r = layer.rotation_matrix.detach()
    torch.testing.assert_close(r @ r.T, torch.eye(16), atol=1e-5, rtol=0)
    assert next(layer.learned_rotation.parameters()).abs().max() > 0.01  # it really moved


def test_cayley_rotation_is_the_cayley_map_and_agrees_with_givens_to_first_order() -> None:
    from poeem.index.cayley import CayleyRotation
    from poeem.index.givens import GivensRotation

    cayley, givens = CayleyRotation(6), GivensRotation(6)
    torch.testing.assert_close(cayley.matrix(), torch.eye(6))
    with torch.no_grad():
        cayley.generator.uniform_(-1, 1)
    s = torch.zeros(6, 6, dtype=torch.float64)
    s[cayley.upper_i, cayley.upper_j] = cayley.generator.detach().double()
    s = s - s.T
    eye = torch.eye(6, dtype=torch.float64)
    expected = torch.linalg.inv(eye - s / 2) @ (eye + s / 2)
    torch.testing.assert_close(cayley.matrix().double(), expected, atol=1e-6, rtol=0)
    # tiny parameters on the same coordinate pairs give the same rotation up to second order
    with torch.no_grad():
        givens.angles.uniform_(-1e-3, 1e-3)
        pairs = {
            (int(i), int(j)): a
            for i, j, a in zip(
                givens.pair_i.flatten(), givens.pair_j.flatten(), givens.angles.flatten(), strict=True
            )
        }
        for n, (i, j) in enumerate(zip(cayley.upper_i.tolist(), cayley.upper_j.tolist(), strict=True)):
            cayley.generator[n] = pairs[(i, j)]
    torch.testing.assert_close(cayley.matrix(), givens.matrix(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("optimizer", ["adam", "adagrad", "sgd", "fused adam", "fused adagrad"])
@pytest.mark.parametrize("rotation", ["givens", "cayley"])
def test_a_step_builds_the_rotation_once_and_never_serves_a_stale_one(optimizer: str, rotation: str) -> None:
    layer, x = ready_layer(rotation)
    name = optimizer.removeprefix("fused ")
    kind = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad, "sgd": torch.optim.SGD}[name]
    # a fused step writes the parameters without moving their in-place version counter
    opt = kind(layer.parameters(), lr=0.05, **({"fused": True} if optimizer != name else {}))
    learned = type(layer.learned_rotation)
    built = []
    original = learned.matrix

    def counted(self: torch.nn.Module) -> torch.Tensor:
        built.append(1)
        return original(self)

    learned.matrix = counted
    try:
        for i in range(5):
            built.clear()
            out = layer(x[i * 64 : (i + 1) * 64])
            routing = layer.list_logits(torch.randn(8, 16), index_grad=False)  # reuses the step's
            fresh = original(layer.learned_rotation).detach()
            torch.testing.assert_close(layer._fixed_rotation(), layer.base_rotation @ fresh)
            assert len(built) == 1 and routing.shape == (8, 4)
            opt.zero_grad()
            out.loss.backward()
            opt.step()  # the parameters move: the next use rebuilds the rotation
            moved = layer.base_rotation @ original(layer.learned_rotation).detach()
            torch.testing.assert_close(layer._fixed_rotation(), moved)
    finally:
        learned.matrix = original


@pytest.mark.parametrize(("k", "d"), [(16, 4), (256, 2), (512, 2)])
def test_training_codes_match_brute_force(k: int, d: int) -> None:
    layer, x = ready_layer("opq", k=k, d=d)
    out = layer(x[:300])  # a training step: sub-codes from FAISS's encoder (K <= 256) or torch
    xr = x[:300] @ layer.rotation_matrix.detach()
    lists = torch.cdist(xr, layer.coarse.detach()).argmin(1)
    assert torch.equal(out.coarse_codes, lists)
    sub = split_subvectors((xr - layer.coarse.detach()[lists]).double(), d)
    for s in range(d):
        expected = torch.cdist(sub[s], layer.codebooks[s].detach().double()).argmin(1)
        assert (out.codes[:, s] == expected).float().mean() > 0.99  # float32 near-ties aside


def test_one_faiss_thread_restores_the_thread_count() -> None:
    import faiss

    from poeem.index.quantize import one_faiss_thread

    before = faiss.omp_get_max_threads()
    with one_faiss_thread():
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == before


def test_opq_reduces_distortion_on_correlated_data() -> None:
    plain, x = ready_layer("none", num_coarse=0)
    opq, _ = ready_layer("opq", num_coarse=0)
    plain.eval(), opq.eval()
    d_plain = float(plain(x).stats["distortion"])
    d_opq = float(opq(x).stats["distortion"])
    assert d_opq < 0.9 * d_plain


def test_warm_start_phase_transitions() -> None:
    layer = PoeemLayer(
        dim=8, num_subspaces=2, codebook_size=4, num_coarse=2, warmup_steps=3, buffer_size=20, kmeans_iters=2
    )
    phases, quantized = [], []
    for _ in range(6):
        out = layer(torch.randn(8, 8))
        phases.append(layer.phase_name)
        quantized.append(out.quantized)
    # steps 1-3 warm-up; 4-5 fill 16 of 20 rows; step 6 completes the buffer and quantizes
    assert phases == ["warmup"] * 3 + ["collect"] * 2 + ["quantize"]
    assert quantized == [False] * 5 + [True]
    assert layer.buffer.shape == (0, 8)


def test_identity_before_initialization() -> None:
    layer = PoeemLayer(dim=8, num_subspaces=2, codebook_size=4, num_coarse=2, warmup_steps=5, buffer_size=20)
    x = torch.randn(3, 8)
    out = layer(x)
    assert torch.equal(out.output, x) and float(out.loss) == 0.0 and out.codes is None


def test_state_dict_mid_warm_start_resumes_identically() -> None:
    kwargs = dict(
        dim=8,
        num_subspaces=2,
        codebook_size=4,
        num_coarse=2,
        warmup_steps=2,
        buffer_size=32,
        kmeans_iters=3,
        rotation="givens",
    )
    batches = [torch.randn(8, 8) for _ in range(10)]
    straight = PoeemLayer(**kwargs)
    for b in batches:
        last = straight(b)
    first = PoeemLayer(**kwargs)
    for b in batches[:4]:  # mid-collection: 2 batches in the buffer
        first(b)
    assert first.phase_name == "collect"
    resumed = PoeemLayer(**kwargs)
    resumed.load_state_dict(first.state_dict())
    for b in batches[4:]:
        out = resumed(b)
    assert torch.equal(out.output, last.output)
    assert torch.equal(resumed.codebooks, straight.codebooks)
    # and an initialized checkpoint loads into a fresh layer (buffer shape (0, dim))
    fresh = PoeemLayer(**kwargs)
    fresh.load_state_dict(straight.state_dict())
    fresh.eval()
    torch.testing.assert_close(fresh(batches[0]).output, straight.eval()(batches[0]).output)


def test_half_precision_input() -> None:
    layer, x = ready_layer()
    out = layer(x[:32].half())
    assert out.output.dtype == torch.float16
    assert out.loss.dtype == torch.float32


def test_stats_report_usage_and_distortion() -> None:
    layer, x = ready_layer(k=16)
    layer.eval()
    out = layer(x)
    s = layer.stats()
    assert set(s) >= {
        "distortion",
        "relative_distortion",
        "subcodes_used",
        "subcode_perplexity",
        "coarse_used",
        "coarse_perplexity",
    }
    assert 1 <= s["subcode_perplexity"] <= 16 and s["subcodes_used"] <= 16
    assert 1 <= s["coarse_perplexity"] <= 4
    expected = (x - out.output).pow(2).sum(1).mean()
    assert s["distortion"] == pytest.approx(float(expected), rel=1e-4)
    assert {k: float(v) for k, v in out.stats.items()} == s


def test_training_stats_count_codes_over_a_window_of_recent_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from poeem.index.stats import batch_usage_counts, usage_stats

    monkeypatch.setattr("poeem.index.layer.USAGE_WINDOW", 300)  # the last 3 batches of 128 rows
    layer, x = ready_layer(k=16)
    batches = [layer(x[i * 128 : (i + 1) * 128]) for i in range(8)]
    window = batches[-3:]
    counts = batch_usage_counts(
        torch.cat([b.coarse_codes for b in window]), torch.cat([b.codes for b in window]), 4, 16
    )
    expected = {k: float(v) for k, v in usage_stats(counts).items()}
    got = layer.stats()
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    everything = batch_usage_counts(
        torch.cat([b.coarse_codes for b in batches]), torch.cat([b.codes for b in batches]), 4, 16
    )
    assert float(usage_stats(everything)["subcode_perplexity"]) != pytest.approx(got["subcode_perplexity"])


def test_givens_matrix_equals_sequential_plane_rotations() -> None:
    from poeem.index.givens import GivensRotation

    g = GivensRotation(7)  # odd dim: a dummy player sits out each round
    with torch.no_grad():
        g.angles.uniform_(-3, 3)
    expected = torch.eye(7, dtype=torch.float64)
    for r in range(g.pair_i.shape[0]):
        for p in range(g.pair_i.shape[1]):
            i, j, t = int(g.pair_i[r, p]), int(g.pair_j[r, p]), float(g.angles.detach()[r, p])
            rot = torch.eye(7, dtype=torch.float64)
            rot[i, i] = rot[j, j] = torch.cos(torch.tensor(t, dtype=torch.float64))
            rot[j, i], rot[i, j] = (
                -torch.sin(torch.tensor(t, dtype=torch.float64)),
                torch.sin(torch.tensor(t, dtype=torch.float64)),
            )
            expected = expected @ rot
    torch.testing.assert_close(g.matrix().double(), expected, atol=1e-6, rtol=0)
    pairs = {(int(a), int(b)) for a, b in zip(g.pair_i.flatten(), g.pair_j.flatten(), strict=True)}
    assert len(pairs) == 7 * 6 // 2  # every plane exactly once


def test_inner_product_coarse_assignment_matches_brute_force() -> None:
    x = correlated(1024, 16)
    layer = PoeemLayer(
        dim=16,
        num_subspaces=4,
        codebook_size=16,
        num_coarse=8,
        coarse_metric="ip",
        warmup_steps=0,
        buffer_size=512,
        kmeans_iters=5,
    )
    layer.initialize(x[:512])
    with torch.no_grad():  # training moves centroids apart in norm; then the two rules differ
        layer.coarse.mul_(torch.linspace(0.5, 1.5, 8).unsqueeze(1))
    coarse_codes, codes = layer.encode(x)
    expected = (x @ layer.coarse.detach().T).argmax(1)
    assert torch.equal(coarse_codes.long(), expected)
    assert not torch.equal(expected, torch.cdist(x, layer.coarse.detach()).argmin(1))  # the rules differ here
    residual = split_subvectors(x - layer.coarse.detach()[expected], 4)
    for d in range(4):
        assert torch.equal(
            codes[:, d].long(), torch.cdist(residual[d], layer.codebooks[d].detach()).argmin(1)
        )


def test_inner_product_lists_are_fitted_for_their_rule() -> None:
    """Regression: L2 k-means centroids under the inner-product rule emptied lists when item
    norms vary (relative distortion 0.26 vs 0.22 for the L2 rule, 2 of 16 lists empty)."""
    x = correlated(6000, 32, seed=3)
    norms = torch.exp(torch.randn(6000, 1, generator=torch.Generator().manual_seed(0)) * 0.5)
    x = x / x.norm(dim=1, keepdim=True) * norms
    distortion = {}
    for rule in ("l2", "ip"):
        layer = PoeemLayer(
            dim=32, num_subspaces=8, codebook_size=16, num_coarse=16, coarse_metric=rule, buffer_size=6000
        )
        layer.initialize(x)
        coarse_codes, codes = layer.encode(x)
        distortion[rule] = float((x - layer.decode(coarse_codes, codes)).pow(2).sum() / x.pow(2).sum())
        if rule == "ip":
            norms = layer.coarse.detach().norm(dim=1)
            torch.testing.assert_close(norms, norms.mean().expand(16))  # one shared norm
            assert torch.bincount(coarse_codes.long(), minlength=16).min() > 0  # no empty list
            l2_rule = torch.cdist(x, layer.coarse.detach()).argmin(1)
            assert (l2_rule == coarse_codes.long()).float().mean() > 0.999  # the rules agree
    assert distortion["ip"] < 1.05 * distortion["l2"]


def test_index_stays_float32_when_the_model_is_cast() -> None:
    """Regression: layer.to(torch.bfloat16) raised a raw dtype error."""
    layer, x = ready_layer("givens")
    layer.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    out = layer(x[:8].bfloat16())
    assert out.output.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_codes_under_autocast_equal_the_exported_codes() -> None:
    """Regression: under CPU autocast 1.75% of items got other codes in training than at export,
    and the warm-start k-means ran in bf16."""
    x = correlated(3000, 32, seed=2)
    tower = torch.nn.Linear(32, 32)
    layer = PoeemLayer(
        dim=32,
        num_subspaces=8,
        codebook_size=16,
        num_coarse=8,
        rotation="givens",
        warmup_steps=2,
        buffer_size=1024,
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(4):  # warm-up, collect, k-means, quantize: all under autocast
            layer(tower(x[i * 512 : (i + 1) * 512]))
        emb = tower(x[2048:])
        out = layer(emb)
    assert emb.dtype == torch.bfloat16 and layer.codebooks.dtype == torch.float32
    coarse_codes, codes = layer.encode(emb.detach())
    assert torch.equal(codes.long(), out.codes) and torch.equal(coarse_codes.long(), out.coarse_codes)


def test_auto_coarse_fit_follows_the_item_norms() -> None:
    """Equal-norm centroids only where L2 k-means fails the inner-product rule: varying norms.
    Normalised items (cosine models) keep the L2 k-means fit."""
    from poeem.index.quantize import resolve_coarse_fit

    x = correlated(2000, 16)
    unit = torch.nn.functional.normalize(x, dim=1)
    assert resolve_coarse_fit(x, "ip", "auto") == "equal_norm"
    assert resolve_coarse_fit(unit, "ip", "auto") == "kmeans"
    assert resolve_coarse_fit(x, "l2", "auto") == "kmeans"
    layer = PoeemLayer(
        dim=16, num_subspaces=4, codebook_size=16, num_coarse=8, coarse_fit="equal_norm", buffer_size=2000
    )
    layer.initialize(unit)
    norms = layer.coarse.detach().norm(dim=1)
    torch.testing.assert_close(norms, norms.mean().expand(8))


@pytest.mark.parametrize("k", [2, 256, 1024])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_faiss_assignment_matches_torch_brute_force(k: int, metric: str) -> None:
    # float32 CPU vectors go through FAISS's flat search and PQ encoder (packed bits for
    # K != 256); float64 ones through the torch path, the reference here
    g = torch.Generator().manual_seed(0)
    x, coarse = torch.randn(3000, 32, generator=g), torch.randn(64, 32, generator=g)
    books = torch.randn(4, k, 8, generator=g)
    lists = coarse_assign(x, coarse, metric, bulk=True)
    residual = x - coarse[lists]
    codes = pq_assign(residual, books, bulk=True)
    assert torch.equal(lists, coarse_assign(x.double(), coarse.double(), metric))
    assert torch.equal(codes, pq_assign(residual.double(), books.double()))


def test_assigning_nan_to_lists_is_a_clear_error() -> None:
    x = torch.randn(10, 8)
    x[3, 0] = float("nan")
    with pytest.raises(PoeemError, match="finite"):
        coarse_assign(x, torch.randn(4, 8), "ip", bulk=True)
