import pytest
import torch

from poeem import PoeemError, PoeemLayer


def small(**kw: object) -> PoeemLayer:
    args = dict(dim=8, num_subspaces=2, codebook_size=4, num_coarse=2, warmup_steps=0, buffer_size=16)
    args.update(kw)
    return PoeemLayer(**args)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        (dict(dim=10, num_subspaces=4), r"num_subspaces: expected a divisor of dim=10, got num_subspaces=4"),
        (dict(codebook_size=1), r"codebook_size: expected K a power of two between 2 and 65536.*got K=1"),
        (dict(codebook_size=70000, buffer_size=70000), r"expected K a power of two .*got K=70000"),
        # regression: K=300 trained, then could never be exported to FAISS
        (
            dict(codebook_size=300, buffer_size=300),
            r"K a power of two .*FAISS stores whole bits\), got K=300",
        ),
        (dict(eval_before_init="skip"), r"eval_before_init: expected 'raise' or 'identity', got 'skip'"),
        (dict(regularizer_weight=-1.0), r"regularizer_weight: expected a finite number >= 0, got -1.0"),
        (dict(commitment_weight=float("nan")), r"commitment_weight: expected a finite number >= 0, got nan"),
        (dict(codebook_size=8, buffer_size=4), r"buffer_size: expected at least max\(K, coarse_K\) = 8"),
        (dict(num_coarse=32, buffer_size=16), r"at least max\(K, coarse_K\) = 32 embeddings.*buffer_size=16"),
        (dict(rotation="pca"), r"rotation: expected 'none', 'opq', 'givens' or 'cayley', got 'pca'"),
        (dict(routing_weight=-0.5), r"routing_weight: expected a finite number >= 0, got -0.5"),
        (dict(routing_lists="some"), r"routing_lists: expected 'auto', 'all' or 'batch', got 'some'"),
        (dict(unquantized_schedule="often"), r"unquantized_schedule: expected 'alternate' or 'every_step'"),
        (dict(list_temperature=0.0), r"list_temperature: expected a finite number > 0, got 0.0"),
        (dict(reseed_after=-1), r"reseed_after: expected an integer >= 0, got -1"),
        (dict(num_coarse=0, balance_weight=1.0), r"balance_weight: expected a coarse quantizer"),
        (dict(num_coarse=4, list_lr_scale=0.0, balance_weight=1.0), r"balance_weight: expected 0 while"),
    ],
)
def test_bad_config_messages(kwargs: dict, pattern: str) -> None:
    with pytest.raises(PoeemError, match=pattern):
        small(**kwargs)


def test_wrong_input_dim() -> None:
    with pytest.raises(PoeemError, match=r"expected shape \(batch, 8\), got shape \(4, 6\).*dim=6"):
        small()(torch.randn(4, 6))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_raises_before_touching_the_buffer(bad: float) -> None:
    layer = small()
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(PoeemError, match=r"expected finite values, got NaN or inf in 1 rows"):
        layer(x)
    assert int(layer.buffer_count) == 0 and int(layer.step) == 0


def test_integer_input() -> None:
    with pytest.raises(PoeemError, match="floating-point"):
        small()(torch.ones(2, 8, dtype=torch.long))


def test_eval_before_initialization() -> None:
    layer = small().eval()
    with pytest.raises(PoeemError, match=r"eval mode: expected an initialized index.*initialize"):
        layer(torch.randn(2, 8))
    ident = small(eval_before_init="identity").eval()
    x = torch.randn(2, 8)
    assert torch.equal(ident(x).output, x)


def test_encode_before_initialization() -> None:
    with pytest.raises(PoeemError, match=r"encode\(\): expected an initialized index"):
        small().encode(torch.randn(2, 8))


def test_initialize_with_too_few_rows() -> None:
    with pytest.raises(PoeemError, match=r"at least max\(K, coarse_K\) = 4 embeddings, got 3"):
        small().initialize(torch.randn(3, 8))


def test_state_dict_shape_mismatch() -> None:
    source = small(codebook_size=8)
    with pytest.raises(
        PoeemError, match=r"codebooks: checkpoint \(2, 8, 4\) vs layer \(2, 4, 4\).*config the checkpoint"
    ):
        small().load_state_dict(source.state_dict())
