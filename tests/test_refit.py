"""Refitting a trained layer's residual coder inside its lists (poeem.index.refit, --refit)."""

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import DIM, assert_same_topk, correlated, tiny_config, trained_layer
from typer.testing import CliRunner

from poeem import PoeemError, Searcher
from poeem.cli import app
from poeem.export import learned_index, to_faiss
from poeem.index.refit import refit_layer
from poeem.pipeline import load_run, resume_config, train_run
from poeem.pipeline.recipe import IndexRecipe
from poeem.pipeline.run import resolve_refit
from poeem.search import FaissSearcher, TorchIVFPQ


@pytest.mark.parametrize("quantizer", ["rq", "pq"])
def test_a_refit_keeps_the_lists_and_codes_the_final_items_better(quantizer: str) -> None:
    layer, x = trained_layer("givens", 8)  # a learned rotation, moved away from its OPQ start
    before = copy.deepcopy(layer.state_dict())
    final = x + 0.5 * correlated(len(x), DIM, seed=7)  # the items moved on after the fit
    new = refit_layer(layer, final, quantizer)
    assert new.config.quantizer == quantizer and new.is_initialized
    assert new.config.rotation == ("none" if quantizer == "rq" else "givens")
    assert torch.equal(new.encode(final)[0], layer.encode(final)[0])  # every item keeps its list
    q = torch.randn(40, DIM)
    with torch.no_grad():  # and every query scores the lists as before: it probes the same ones
        torch.testing.assert_close(
            (q @ new.rotation_matrix) @ new.coarse.T, (q @ layer.rotation_matrix) @ layer.coarse.T
        )

    def error(lay: object) -> float:
        return float((lay.decode(*lay.encode(final)) - final).pow(2).sum(1).mean())

    assert error(new) < 0.8 * error(layer)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())  # not changed


def test_a_refit_exports_to_faiss_as_it_scores() -> None:
    layer, x = trained_layer("givens", 8)
    new = refit_layer(layer, x, "rq")
    xq = torch.randn(30, DIM)
    d1, i1 = FaissSearcher(to_faiss(new, x, metric="ip")).search(xq, 15, 2)
    d2, i2 = TorchIVFPQ(learned_index(new, x), "ip").search(xq, 15, 2)
    assert_same_topk(d1.numpy(), i1.numpy(), d2.numpy(), i2.numpy())


def test_bad_input_is_a_clear_error() -> None:
    layer, x = trained_layer("none", 8)
    with pytest.raises(PoeemError, match="'pq' or 'rq'"):
        refit_layer(layer, x, "lsq")
    with pytest.raises(PoeemError, match=r"shape \(batch, 16\)"):
        refit_layer(layer, x[:, :8], "rq")
    with pytest.raises(PoeemError, match="at least K = 16 items"):
        refit_layer(layer, x[:10], "rq")
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(PoeemError, match="finite values"):
        refit_layer(layer, bad, "rq")
    fresh = copy.deepcopy(layer)
    fresh.initialized.fill_(False)
    with pytest.raises(PoeemError, match="past its warm start"):
        refit_layer(fresh, x, "rq")


def test_a_run_trained_with_refit_serves_the_refit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import poeem.pipeline.recipe as recipe

    refitted = []  # the lists of the layer the refit made, before its distillation

    def refit_and_keep(*args: object, **kwargs: object) -> object:
        layer = refit_layer(*args, **kwargs)
        refitted.append(layer.coarse.detach().clone())
        return layer

    monkeypatch.setattr(recipe, "refit_layer", refit_and_keep)
    monkeypatch.setattr("poeem.training.distill.GUARD_Z", float("inf"))  # the distilled index is kept
    cfg = tiny_config()
    cfg.model.poeem["num_coarse"] = 4
    cfg.train.refit, cfg.train.distill_epochs = "rq", 1
    model, metrics = train_run(cfg, tmp_path / "run")
    assert metrics["refit"]["quantizer"] == "rq" and metrics["distill"]["epochs"] >= 1
    assert not metrics["distill"]["kept_start"]
    assert torch.equal(model.index.coarse, refitted[0])  # distilled in the lists as trained
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["model"]["poeem"].get("quantizer") is None  # trained with PQ, as asked
    _, loaded = load_run(tmp_path / "run")
    assert loaded.index.config.quantizer == "rq"
    assert torch.equal(loaded.index.codebooks, model.index.codebooks)
    result = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "ix")])
    assert result.exit_code == 0, (result.output, result.exception)
    kept = loaded.index.trained  # the codes the distillation kept, saved with the run
    assert bool(kept.distilled().all())
    xq = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)  # as cosine searches
    d1, i1 = Searcher.load(tmp_path / "ix").search(xq, 10, 2)
    ours = learned_index(loaded.index, (kept.coarse_codes.long(), kept.codes.long()))
    d2, i2 = TorchIVFPQ(ours, "ip").search(xq, 10, 2)
    assert_same_topk(d1, i1, d2.numpy(), i2.numpy())
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "run")])
    assert result.exit_code == 0, (result.output, result.exception)


def test_poeem_distill_refits_a_run_without_changing_it(tmp_path: Path) -> None:
    train_run(tiny_config(), tmp_path / "run")
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    args = ["distill", str(tmp_path / "run"), "--out", str(tmp_path / "ix"), "--rounds", "1", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--teacher-k", "20", "--no-progress", "--refit", "rq"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    assert Searcher.load(tmp_path / "ix").ntotal == 10_000
    result = CliRunner().invoke(app, [*args[:4], "--replace", "--refit", "lsq"])
    assert "'pq' or 'rq'" in str(result.exception)
    result = CliRunner().invoke(app, ["distill", "--items", "x.npy", "--refit", "rq"])
    assert "a RUN_DIR (a trained layer's lists)" in str(result.exception)


def test_a_refit_needs_a_layer_and_is_refused_before_training(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg.model.poeem, cfg.train.refit = None, "rq"
    with pytest.raises(PoeemError, match="a run with a Poeem layer"):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train", "--refit", "opq", "--run-dir", str(tmp_path / "cli")])
    assert "train.refit" in str(
        result.exception
    ) and "expected 'auto', 'pq', 'rq' or 'none', got 'opq'" in str(result.exception)
    assert not (tmp_path / "cli").exists()
    cfg = tiny_config()
    cfg.model.poeem["schedule"], cfg.train.refit = "after_training", "rq"
    with pytest.raises(PoeemError, match="--refit: expected a layer trained with the model"):
        train_run(cfg, tmp_path / "after")
    assert not (tmp_path / "after").exists()
    assert resolve_refit(replace(cfg, train=replace(cfg.train, refit="auto"))).train.refit is None


def test_a_run_with_refit_rq_serves_it_and_reports_its_index_as_trained(tmp_path: Path) -> None:
    refitted, as_trained = tiny_config(), tiny_config()
    assert as_trained.train.refit is None  # the default: the index as trained
    refitted.train.refit = "rq"  # an opt-in
    _, metrics = train_run(refitted, tmp_path / "refitted")
    _, plain = train_run(as_trained, tmp_path / "plain")
    assert metrics["refit"]["quantizer"] == "rq" and "refit" not in plain
    assert load_run(tmp_path / "refitted")[1].index.config.quantizer == "rq"
    stored = json.loads((tmp_path / "refitted" / "config.json").read_text())
    assert stored["train"]["refit"] == "rq"  # a resume does the same
    rows, plain_rows = ({r["method"]: r for r in m["rows"]} for m in (metrics, plain))
    # the index the run would have served without the refit, measured before it was replaced
    assert rows["poeem-as-trained"]["recall@10"] == plain_rows["poeem"]["recall@10"]
    assert rows["poeem-as-trained"]["codes_scanned"] == plain_rows["poeem"]["codes_scanned"]
    assert (
        "poeem-as-trained" not in plain_rows
        and not (tmp_path / "plain" / "index_as_trained.safetensors").exists()
    )
    # the index as trained is kept beside the refit: exported, it is the --refit none run's
    for run, flags in ((tmp_path / "refitted", ["--as-trained"]), (tmp_path / "plain", [])):
        args = ["export", str(run), "--out", str(run / "ix"), "--fast-scan", *flags]  # PQ, K = 16
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (result.output, result.exception)
    kept, plain_ix = (Searcher.load(tmp_path / r / "ix").tensors for r in ("refitted", "plain"))
    assert torch.equal(kept.codes, plain_ix.codes) and torch.equal(kept.coarse_codes, plain_ix.coarse_codes)
    assert torch.equal(kept.codebooks, plain_ix.codebooks)
    result = CliRunner().invoke(
        app, ["export", str(tmp_path / "refitted"), "--out", str(tmp_path / "rq"), "--fast-scan"]
    )
    assert "poeem export --as-trained" in str(result.exception)  # the refit is RQ: no fast scan
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "refitted"), "--as-trained"])
    assert result.exit_code == 0, (result.output, result.exception)
    lines = result.output.splitlines()
    header = next(line.split() for line in lines if line.startswith("method"))
    shown = {
        line.split()[0]: dict(zip(header, line.split(), strict=True))
        for line in lines
        if line.startswith("poeem")
    }
    assert shown["poeem"]["index"] == "IVF2,PQ4x4fs"  # the index as trained, as `poeem export` writes it
    assert float(shown["poeem"]["recall@10"]) == pytest.approx(plain_rows["poeem"]["recall@10"], abs=1e-4)
    with pytest.raises(PoeemError, match="the index as trained or a refit"):
        IndexRecipe(start="as-trained", refit="rq")
    (tmp_path / "refitted" / "index_as_trained.safetensors").unlink()  # a run refitted by an older poeem
    with pytest.raises(PoeemError, match="train the run again with --refit none"):
        load_run(tmp_path / "refitted", as_trained=True)
    baseline = tiny_config()
    baseline.model.poeem, baseline.train.refit = None, "auto"
    _, metrics = train_run(baseline, tmp_path / "baseline")
    assert "refit" not in metrics  # "auto": nothing to refit, and no error either
    assert json.loads((tmp_path / "baseline" / "config.json").read_text())["train"]["refit"] is None


def test_the_default_serves_the_index_as_trained_and_auto_refits_in_one_process_only(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from poeem.pipeline.run import resolve_refit

    auto = tiny_config()
    auto.train.refit = "auto"
    assert resolve_refit(tiny_config()).train.refit is None  # one process
    assert resolve_refit(auto).train.refit == "rq"
    monkeypatch.setattr("poeem.distributed.is_active", lambda: True)
    monkeypatch.setattr("poeem.distributed.is_main", lambda: True)
    assert resolve_refit(tiny_config()).train.refit is None  # torchrun: the same, and silent
    assert capsys.readouterr().out == ""
    assert resolve_refit(auto).train.refit is None
    assert "poeem distill RUN_DIR --refit rq" in capsys.readouterr().out
    asked = tiny_config()
    asked.train.refit = "rq"
    assert resolve_refit(asked).train.refit == "rq"  # refused later, with how to refit after training


def test_a_finished_run_resumed_with_refit_is_refitted(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg = replace(cfg, train=replace(cfg.train, refit="none"))  # as TOML or the command line say it
    _, trained = train_run(cfg, tmp_path / "run")
    assert "refit" not in trained and load_run(tmp_path / "run")[1].index.config.quantizer == "pq"
    cfg, applied = resume_config(tmp_path / "run", {"train": {"refit": "rq", "distill_epochs": 1}})
    assert "train.refit: default -> rq" in applied
    _, metrics = train_run(cfg, tmp_path / "run", resume=True)
    assert metrics["steps"] == trained["steps"] and metrics["refit"]["quantizer"] == "rq"
    assert load_run(tmp_path / "run")[1].index.config.quantizer == "rq"


def test_a_refits_distillation_keeps_the_trained_lists(tmp_path: Path) -> None:
    from poeem.data import load_data
    from poeem.pipeline.recipe import RunSource, build_index, run_distill_config
    from poeem.pipeline.run_dir import read_artifacts
    from poeem.training.distill import DistillConfig

    cfg = tiny_config()
    cfg.model.poeem["num_coarse"] = 4
    train_run(cfg, tmp_path / "run")
    cfg, model = load_run(tmp_path / "run")
    data, features = load_data(cfg.data), read_artifacts(tmp_path / "run").item_features
    with torch.no_grad():
        items = model.all_item_embeddings(features)
    start = refit_layer(model.index, items, "rq")
    config = DistillConfig(rounds=2, epochs=2, teacher_k=20, holdout=0.0)  # no guard: it distils
    recipe = IndexRecipe(start="refit", refit="rq", distill=config)
    built = build_index(RunSource(model, features, cfg, data), recipe, progress=False)
    layer, (coarse_codes, _) = built.layer, built.items
    assert torch.equal(layer.coarse, start.coarse)  # the lists as trained
    assert torch.equal(coarse_codes, start.encode(items)[0].long())  # every item in its list
    assert not torch.equal(layer.codebooks, start.codebooks)  # while the coder was distilled
    # and so is a run trained with --refit when it is distilled again (poeem distill RUN_DIR)
    cfg.train.refit = "rq"
    kept = replace(config.keeping_lists(), teacher_k=20, guard_k=10)
    assert run_distill_config(config, cfg, 10_000) == kept
    cfg.train.refit = None
    assert run_distill_config(config, cfg, 10_000).coarse_lr == config.coarse_lr > 0
