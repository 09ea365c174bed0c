"""One path builds the served index: a recipe applied by ``build_index``, from a run or from
any embeddings."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

from poeem import PoeemError, Searcher
from poeem.cli import app
from poeem.pipeline import export_run, load_run, train_run
from poeem.pipeline.recipe import EmbeddingSource, IndexRecipe, build_index
from poeem.training.distill import DistillConfig


def test_a_recipe_says_one_start_and_refuses_contradictions() -> None:
    for bad, message in (
        ({"start": "as-trained", "refit": "rq"}, "the index as trained or a refit"),
        ({"start": "refit"}, "the index as trained or a refit"),
        ({"start": "faiss"}, "faiss_file exactly with start 'faiss'"),
        ({"start": "trained", "layer": {"num_subspaces": 8}}, "layer settings only with start 'fit'"),
        ({"start": "faiss", "faiss_file": "x.faiss", "layer": {"num_coarse": 4}}, "no layer flags but"),
        ({"start": "retrained"}, "recipe start"),
        ({"from_training": "all"}, "from_training"),
    ):
        with pytest.raises(PoeemError, match=message):
            IndexRecipe(**bad)  # type: ignore[arg-type]


def test_the_run_recipe_and_the_same_recipe_applied_afterwards_build_the_same_index(tmp_path: Path) -> None:
    """``poeem train --refit rq --distill-epochs 1`` and a plain run refitted and distilled later
    (``poeem distill RUN --refit rq``) go through the same function: the same index (the same
    codes; parameters equal up to float rounding)."""
    plain = tiny_config()
    refitted = replace(plain, train=replace(plain.train, refit="rq", distill_epochs=1))
    train_run(plain, tmp_path / "plain")
    train_run(refitted, tmp_path / "refitted")
    during = export_run(tmp_path / "refitted", tmp_path / "during", fast_scan=False)
    recipe = IndexRecipe(start="refit", refit="rq", distill=DistillConfig(epochs=1, seed=plain.train.seed))
    after = export_run(tmp_path / "plain", tmp_path / "after", fast_scan=False, recipe=recipe)
    assert during is not None and after is not None
    a, b = during.tensors, after.tensors
    assert torch.equal(a.codes, b.codes) and torch.equal(a.coarse_codes, b.coarse_codes)
    for name in ("coarse", "codebooks", "rotation"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-6)
    # the plain run itself is unchanged: the recipe built a new index beside it
    _, model = load_run(tmp_path / "plain")
    assert model.index is not None and model.index.config.quantizer == "pq"


def test_a_fit_from_embeddings_codes_each_item_as_a_brute_force_search_would(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    items, queries = (
        rng.normal(size=(400, 16)).astype(np.float32),
        rng.normal(size=(50, 16)).astype(np.float32),
    )
    source = EmbeddingSource(items, queries, "ip")
    recipe = IndexRecipe(start="fit", layer={"num_coarse": 4, "num_subspaces": 4, "codebook_size": 16})
    built = build_index(source, recipe, progress=False)
    assert isinstance(built.items, torch.Tensor) and list(built.stages) == ["fit"]  # no distillation asked
    layer, x = built.layer, torch.from_numpy(items)
    lists = torch.argmax(x @ layer.coarse.T, dim=1)  # the ip rule: largest inner product
    coarse_codes, _ = layer.encode(x)
    assert torch.equal(coarse_codes.long(), lists)
    searcher = Searcher.create(tmp_path / "ix", layer, built.items, metric="ip")
    assert searcher.ntotal == 400 and searcher.describe().startswith("4 lists, 2 bytes per item")


def test_poeem_distill_on_a_run_builds_by_its_recipe(tmp_path: Path) -> None:
    train_run(tiny_config(), tmp_path / "run")
    args = ["distill", str(tmp_path / "run"), "--out", str(tmp_path / "ix"), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--rounds", "1", "--epochs", "1", "--no-fast-scan"])
    assert result.exit_code == 0, (result.output, result.exception)
    for extra, message in (
        (["--num-subspaces", "8"], "no layer flags for a run with a Poeem layer"),
        (["--refit", "rq", "--num-subspaces", "8"], "a refit keeps the shape of the run's trained layer"),
        (["--queries", "q.npy"], "--queries: expected --items"),
        (["--from-faiss", "x.faiss"], "--from-faiss: expected --items"),
    ):
        result = CliRunner().invoke(app, [*args[:3], str(tmp_path / "ix2"), *extra])
        assert message in str(result.exception), (extra, result.exception)
    assert not (tmp_path / "ix2").exists()


def test_a_failed_fit_after_training_names_the_distill_flags_of_the_same_index() -> None:
    from typer.testing import CliRunner

    from poeem.cli import app
    from poeem.pipeline.run import _fit_flags

    settings = {"num_coarse": 4, "num_subspaces": 8, "quantizer": "rq", "rotation": "opq", "seed": 3}
    flags = _fit_flags(settings)
    assert flags == "--codebook-size 256 --num-coarse 4 --num-subspaces 8 --quantizer rq --rotation opq"
    assert "--codebook-size 16" in _fit_flags({**settings, "codebook_size": 16})
    help_text = CliRunner().invoke(app, ["distill", "--help"], terminal_width=200).output
    assert all(flag in help_text for flag in flags.split() if flag.startswith("--"))
