"""Index distillation: the index learns the model's own ranking, with no labels."""

import copy
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from conftest import DIM, assert_same_topk, clustered, correlated, distill_from_faiss_file, tiny_config
from typer.testing import CliRunner

from poeem import PoeemError, PoeemLayer, Searcher
from poeem.cli import app
from poeem.data import load_data
from poeem.export import learned_index
from poeem.export.faiss_codec import pack_sa_codes
from poeem.model.query_encoder import QueryEncoder
from poeem.pipeline import resume_config, train_run
from poeem.pipeline.recipe import (
    DEFAULT_DISTILL_EPOCHS,
    distill_epochs,
    layer_from_faiss,
    new_layer,
    run_distill_config,
)
from poeem.search import FaissSearcher, FlatIndex, TorchIVFPQ
from poeem.training.distill import DistillConfig, distill_index, listnet


def fitted_layer(items: torch.Tensor, rotation: str = "givens", num_coarse: int = 8) -> PoeemLayer:
    layer = PoeemLayer(
        dim=DIM,
        num_subspaces=4,
        codebook_size=16,
        num_coarse=num_coarse,
        rotation=rotation,
        coarse_metric="ip",
        warmup_steps=0,
        buffer_size=256,
        kmeans_iters=5,
        opq_rounds=1,
    )
    layer.initialize(items)
    return layer


def overlap_with_teacher(
    layer: PoeemLayer, items: torch.Tensor, queries: torch.Tensor, codes: tuple, k: int = 10
) -> float:
    _, exact = FlatIndex(items, "ip").search(queries, k)
    _, got = TorchIVFPQ(learned_index(layer, codes), "ip").search(queries, k, layer.config.num_coarse)
    return float(
        np.mean([len(set(a) & set(b)) / k for a, b in zip(exact.tolist(), got.tolist(), strict=True)])
    )


def test_distillation_lowers_the_loss_and_matches_the_teacher_better() -> None:
    items, queries = clustered(1500, 0), clustered(600, 1)
    layer = fitted_layer(items)
    before = overlap_with_teacher(layer, items, queries, layer.encode(items))
    config = DistillConfig(rounds=2, epochs=5, teacher_k=30, batch_size=64, codebook_lr=3e-3, holdout=0.0)
    result = distill_index(layer, items, queries, config, progress=False)
    losses = [row["code_loss"] for row in result.history]
    assert losses[-1] < losses[0] and result.history[-1]["list_loss"] < result.history[0]["list_loss"]
    after = overlap_with_teacher(layer, items, queries, (result.coarse_codes, result.codes))
    assert after > before + 0.01, (before, after)  # measured: 0.314 -> 0.332


def test_listnet_is_smallest_when_the_student_ranks_like_the_teacher() -> None:
    teacher = torch.randn(4, 30)
    assert listnet(teacher, teacher, 0.5) < listnet(teacher, -teacher, 0.5)
    assert listnet(teacher, teacher, 0.5) < listnet(teacher, torch.randn(4, 30), 0.5)


def test_frozen_codes_stay_frozen_and_in_range() -> None:
    items, queries = clustered(800, 2), clustered(200, 3)
    layer = fitted_layer(items)
    cc, codes = layer.encode(items)
    # holdout 0: no guard, so the codewords move and the rotation trains
    config = DistillConfig(rounds=2, epochs=2, reassign=False, teacher_k=20, batch_size=50, holdout=0.0)
    result = distill_index(layer, items, queries, config, progress=False)
    assert torch.equal(result.codes, codes.long()) and torch.equal(result.coarse_codes, cc.long())
    reassigned = distill_index(
        layer, items, queries, DistillConfig(rounds=2, epochs=1, teacher_k=20, holdout=0.0), progress=False
    )
    assert int(reassigned.codes.max()) < 16 and int(reassigned.coarse_codes.max()) < 8
    # the rotation stays orthogonal while the Givens angles train
    r = layer.rotation_matrix.detach()
    torch.testing.assert_close(r @ r.T, torch.eye(DIM), atol=1e-5, rtol=0)


def test_the_heldout_queries_pick_the_epoch_kept() -> None:
    items, queries = clustered(800, 4), clustered(300, 5)
    layer = fitted_layer(items, rotation="none")
    result = distill_index(
        layer, items, queries, DistillConfig(rounds=1, epochs=4, teacher_k=20), progress=False
    )
    best = min(result.history, key=lambda row: row["heldout_code_loss"])
    assert result.best == best


@pytest.mark.parametrize("rotation", ["none", "givens"])
def test_the_index_returned_is_the_one_the_heldout_queries_scored(rotation: str) -> None:
    from poeem.training.distill import _Teacher

    items, queries = clustered(800, 4), clustered(300, 5)
    cfg = DistillConfig(rounds=3, epochs=2, teacher_k=20, patience=None)
    layer = fitted_layer(items, rotation=rotation)
    result = distill_index(layer, items, queries, cfg, progress=False)
    # on these data the re-encoded codes win without a rotation, and the measured ones with it
    assert not result.kept_start and result.reencoded == (rotation == "none")
    # the same split of the queries: the generator draws the held-out queries first
    teacher = _Teacher(layer, items, queries, cfg, torch.Generator().manual_seed(cfg.seed))
    loss = teacher.heldout_loss((result.coarse_codes, result.codes))
    # the codes the best epoch was measured with, or the re-encoded ones when they score better
    as_measured = loss == pytest.approx(result.best["heldout_code_loss"], rel=1e-6)
    assert as_measured != result.reencoded
    assert loss <= result.best["heldout_code_loss"] * (1 + 1e-6)
    reencoded = tuple(c.long() for c in layer.encode(items))
    assert loss <= teacher.heldout_loss(reencoded) * (1 + 1e-6)
    same = torch.equal(reencoded[1], result.codes) and torch.equal(reencoded[0], result.coarse_codes)
    assert same == result.reencoded


def test_the_teacher_ranks_a_sample_of_many_queries() -> None:
    from poeem.training.distill import MAX_QUERIES, _Teacher

    items, queries = clustered(800, 4), clustered(300, 5)
    layer = fitted_layer(items, rotation="none")
    cfg = DistillConfig(rounds=1, epochs=3, teacher_k=20, max_queries=100, holdout=0.0)
    teacher = _Teacher(layer, items, queries, cfg, torch.Generator().manual_seed(cfg.seed))
    assert teacher.queries.shape[0] == teacher.fit.numel() == 100
    # a sample of the given queries, each at most once
    rows = torch.cdist(teacher.queries, queries).argmin(dim=1)
    assert torch.equal(queries[rows], teacher.queries) and rows.unique().numel() == 100
    # the temperature: the mean std of the sample's exact top-k scores
    top = (teacher.queries @ items.T).topk(20, dim=1).values
    assert teacher.temperature == pytest.approx(float(top.std(dim=1).mean()), rel=1e-5)
    losses = [row["code_loss"] for row in distill_index(layer, items, queries, cfg, progress=False).history]
    assert losses[-1] < losses[0]
    assert DistillConfig(max_queries=0).max_queries is None  # 0: every query, as on the command line
    with pytest.raises(PoeemError, match=r"distill\.max_queries: expected an integer >= 0 or None, got -1"):
        DistillConfig(max_queries=-1)
    assert str(MAX_QUERIES) in CliRunner().invoke(app, ["distill", "--help"], terminal_width=200).output


def test_a_round_holds_the_codes_in_their_smallest_dtype(tmp_path: Path) -> None:
    from poeem.training.checkpoint import read_checkpoint

    items, queries = clustered(600, 2), clustered(150, 3)
    layer, state = fitted_layer(items), tmp_path / "state.safetensors"
    config = DistillConfig(rounds=1, epochs=1, teacher_k=20)
    result = distill_index(layer, items, queries, config, progress=False, checkpoint=state)
    tensors, _ = read_checkpoint(state)  # a catalogue's codes, 8x smaller than int64 while frozen
    assert tensors["extra.codes"].dtype == tensors["extra.coarse_codes"].dtype == torch.uint8
    assert result.codes.dtype == result.coarse_codes.dtype == torch.int64  # returned as documented


def test_patience_ends_rounds_that_stop_improving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items, queries = clustered(600, 4), clustered(200, 5)
    frozen = {"codebook_lr": 0.0, "coarse_lr": 0.0, "rotation_lr": 0.0}  # the held-out loss never improves
    cfg = DistillConfig(rounds=3, epochs=10, teacher_k=20, patience=2, **frozen)
    result = distill_index(fitted_layer(items), items, queries, cfg, progress=False)
    # round 0: the first epoch is the best, 2 more end it; round 1 the same, and found nothing better: stop
    assert [(r["round"], r["epoch"]) for r in result.history] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (1, 2),
    ]
    assert (result.best["round"], result.best["epoch"]) == (0, 0)
    every = distill_index(fitted_layer(items), items, queries, replace(cfg, patience=None), progress=False)
    assert len(every.history) == 30
    # stopped inside the skipped schedule (the end of round 0, where patience jumps to round 1)
    # and resumed: the same epochs run
    state = tmp_path / "state.safetensors"
    stop_after_saved_states(monkeypatch, 3, fitted_layer(items), items, queries, cfg, state)
    resumed = distill_index(
        fitted_layer(items), items, queries, cfg, progress=False, checkpoint=state, resume=True
    )
    assert resumed.history == result.history


def test_a_round_that_keeps_improving_on_itself_runs_on() -> None:
    """Re-assigned codes start a round above the best so far; the round is judged by its own best."""
    from poeem.training.distill import _next_step

    cfg = DistillConfig(rounds=3, epochs=10, patience=2)
    round0 = [{"round": 0, "epoch": e, "heldout_code_loss": loss} for e, loss in enumerate([4.0, 4.1, 4.2])]
    best = (4.0, [], round0[0], (None, torch.zeros(0)))
    climbing = [{"round": 1, "epoch": e, "heldout_code_loss": 5.0 - 0.1 * e} for e in range(4)]
    assert _next_step(13, round0 + climbing, best, cfg) == 14  # 4 epochs above 4.0, each better than the last
    stalled = climbing + [{"round": 1, "epoch": e, "heldout_code_loss": 4.9} for e in (4, 5)]
    assert _next_step(15, round0 + stalled, best, cfg) == 30  # stalled, nothing better than round 0: stop
    best1 = (3.9, [], {"round": 1, "epoch": 3}, (None, torch.zeros(0)))
    assert _next_step(15, round0 + stalled, best1, cfg) == 20  # round 1 found a better index: round 2


@pytest.mark.parametrize("rotation", ["none", "givens"])
def test_a_distilled_index_exports_bit_for_bit_to_faiss(tmp_path: Path, rotation: str) -> None:
    items, queries = clustered(900, 6), clustered(200, 7)
    layer = fitted_layer(items, rotation)
    config = DistillConfig(rounds=1, epochs=2, teacher_k=20, holdout=0.0)  # the distilled codes, unguarded
    result = distill_index(layer, items, queries, config, progress=False)
    codes = (result.coarse_codes, result.codes)
    searcher = Searcher.create(tmp_path / "ix", layer, codes, metric="ip", fast_scan=False)  # exact ADC
    xq = correlated(25, DIM, seed=8)
    d, i = searcher.search(xq, 10, nprobe=3)
    d2, i2 = TorchIVFPQ(learned_index(layer, (result.coarse_codes, result.codes)), "ip").search(xq, 10, 3)
    assert_same_topk(d, i, d2.numpy(), i2.numpy())
    assert torch.equal(searcher.tensors.codes, result.codes)
    assert isinstance(searcher._engine.base, FaissSearcher)


def test_any_embeddings_through_the_cli(tmp_path: Path) -> None:
    items, queries = clustered(1200, 9), clustered(300, 10)
    np.save(tmp_path / "items.npy", items.numpy())
    np.save(tmp_path / "queries.npy", queries.numpy())
    (tmp_path / "ids.txt").write_text("".join(f"doc-{i}\n" for i in range(1200)))
    args = ["distill", "--items", str(tmp_path / "items.npy"), "--queries", str(tmp_path / "queries.npy")]
    args += ["--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "ix"), "--num-coarse", "8"]
    args += ["--num-subspaces", "4", "--codebook-size", "16", "--rotation", "opq", "--rounds", "1"]
    args += ["--epochs", "2", "--teacher-k", "20", "--no-progress", "--metric", "cosine"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert (
        "distilled index of 1200 items (8 lists, 2 bytes per item (4 x 4-bit PQ codes), fast scan)"
        in result.output
    )
    searcher = Searcher.load(tmp_path / "ix")
    _, ids = searcher.search(queries[:3], 5, nprobe=8)
    assert ids.dtype.kind == "U" and all(i.startswith("doc-") for i in ids.ravel())


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    items = clustered(300, 11)
    layer = fitted_layer(items)
    with pytest.raises(PoeemError, match=r"distill queries: expected shape \(n, 16\), got shape \(5, 8\)"):
        distill_index(layer, items, torch.randn(5, 8), progress=False)
    bad = torch.randn(5, DIM)
    bad[2, 3] = float("nan")
    with pytest.raises(PoeemError, match="distill queries: expected finite values"):
        distill_index(layer, items, bad, progress=False)
    with pytest.raises(PoeemError, match=r"distill\.teacher_k: expected at most the 300 items"):
        distill_index(layer, items, torch.randn(5, DIM), DistillConfig(teacher_k=400), progress=False)
    with pytest.raises(PoeemError, match="distill: expected an initialized index"):
        distill_index(PoeemLayer(dim=DIM, num_subspaces=4, codebook_size=16), items, items, progress=False)
    np.save(tmp_path / "few.npy", np.random.default_rng(0).normal(size=(100, DIM)).astype(np.float32))
    args = ["distill", "--items", str(tmp_path / "few.npy"), "--queries", str(tmp_path / "few.npy")]
    args += ["--num-subspaces", "4", "--codebook-size", "256", "--out", str(tmp_path / "ix")]
    result = CliRunner().invoke(app, args)
    assert "at least max(K, coarse_K) = 256 embeddings" in str(result.exception)
    result = CliRunner().invoke(app, ["distill", "--out", str(tmp_path / "ix")])
    assert "a RUN_DIR or --items (one of them)" in str(result.exception)
    result = CliRunner().invoke(app, [*args[:5], "--out", str(tmp_path / "ix")])  # no --num-subspaces
    assert "pass e.g. --num-subspaces 8 (8 bytes per item at K=256)" in str(result.exception)


def test_a_run_is_distilled_without_changing_it(tmp_path: Path) -> None:
    train_run(tiny_config(), tmp_path / "run")
    weights = (tmp_path / "run" / "model.safetensors").read_bytes()
    args = ["distill", str(tmp_path / "run"), "--out", str(tmp_path / "ix"), "--rounds", "1", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--teacher-k", "20", "--no-progress"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == weights
    searcher = Searcher.load(tmp_path / "ix")
    assert searcher.ntotal == 10_000 and searcher.query_tower is not None
    baseline = copy.deepcopy(tiny_config())
    baseline.model.poeem = None
    train_run(baseline, tmp_path / "base")
    result = CliRunner().invoke(app, ["distill", str(tmp_path / "base"), "--out", str(tmp_path / "ix2")])
    assert "layer flags (e.g. --num-subspaces 8)" in str(result.exception)
    result = CliRunner().invoke(
        app, ["distill", str(tmp_path / "base"), "--out", str(tmp_path / "ix2"), "--refit", "rq"]
    )
    assert "a run trained with a Poeem layer (its lists are kept)" in str(result.exception)
    result = CliRunner().invoke(
        app,
        [
            "distill",
            str(tmp_path / "base"),
            "--out",
            str(tmp_path / "ix2"),
            "--num-coarse",
            "4",
            "--num-subspaces",
            "4",
            "--codebook-size",
            "16",
            "--rounds",
            "1",
            "--epochs",
            "1",
            "--teacher-k",
            "20",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, (result.output, result.exception)
    assert Searcher.load(tmp_path / "ix2").nlist == 4


def test_train_distils_its_index_after_training_even_on_resume(tmp_path: Path) -> None:
    # a finished run resumed with --distill-epochs: no training step left, then distillation
    cfg = tiny_config()
    cfg.train.refit = None  # the index as trained: without a refit, id runs do not distil
    plain, trained = train_run(cfg, tmp_path / "run")
    before = copy.deepcopy(plain.index)
    cfg, applied = resume_config(tmp_path / "run", {"train": {"distill_epochs": 1}})
    assert applied == ["train.distill_epochs: default -> 1"]
    model, metrics = train_run(cfg, tmp_path / "run", resume=True)
    assert metrics["steps"] == trained["steps"] and metrics["distill"]["epochs"] == 3  # rounds x 1
    towers = {k: v for k, v in model.state_dict().items() if not k.startswith("index.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in towers.items())  # the towers are frozen
    assert not torch.equal(model.index.codebooks, before.codebooks)
    data = load_data(cfg.data)
    with torch.no_grad():
        items = model.all_item_embeddings(None)
        queries = QueryEncoder.from_model(model, data).by_rows(np.unique(data.train_queries))
    distilled = overlap_with_teacher(model.index, items, queries, model.index.encode(items))
    assert distilled > overlap_with_teacher(before, items, queries, before.encode(items))


def test_distill_epochs_need_a_layer(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg.model.poeem = None
    cfg.train.distill_epochs = 1
    with pytest.raises(PoeemError, match="a run with a Poeem layer"):
        train_run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_index_fitted_after_training_takes_8_bit_codes_at_the_same_bytes() -> None:
    from poeem.index.config import fitted_codes

    assert fitted_codes({}) == {"num_subspaces": 8, "codebook_size": 256}  # 8 bytes, as the default
    assert fitted_codes({"num_subspaces": 32}) == {"num_subspaces": 16, "codebook_size": 256}
    assert fitted_codes({"num_subspaces": 32, "codebook_size": 16}) == {}  # asked for: kept
    assert fitted_codes({"num_subspaces": 5}) == {}  # 20 bits: no whole number of 8-bit codes


def test_refitted_and_text_runs_distil_by_default_and_other_runs_when_asked() -> None:
    cfg = tiny_config()
    assert cfg.train.refit is None and cfg.train.distill_epochs is None
    assert distill_epochs(cfg) == 0  # id towers as trained, the default
    cfg.model.text = {"encoder": "any"}
    assert cfg.model.index_schedule == "after_training"
    assert distill_epochs(cfg) == DEFAULT_DISTILL_EPOCHS  # text towers: fitted, then distilled
    cfg.model.poeem["schedule"] = "joint"
    assert distill_epochs(cfg) == 0  # text towers trained jointly: as trained
    cfg.model.text = None
    cfg.train.refit = "rq"
    assert distill_epochs(cfg) == DEFAULT_DISTILL_EPOCHS  # a refit, asked for
    cfg.train.distill_epochs = 0  # asked not to
    assert distill_epochs(cfg) == 0
    cfg.train.distill_epochs, cfg.model.poeem = None, None  # no layer to distil
    assert distill_epochs(cfg) == 0


def test_distillation_starts_from_a_faiss_file(tmp_path: Path) -> None:
    items, queries = clustered(1500, 0).numpy(), clustered(600, 1).numpy()
    index = faiss.index_factory(DIM, "OPQ4,IVF8,PQ4x4", faiss.METRIC_INNER_PRODUCT)
    index.train(items)
    index.add(items)
    faiss.write_index(index, str(tmp_path / "start.faiss"))
    layer, metric = layer_from_faiss(tmp_path / "start.faiss", DIM, None)
    assert metric == "ip" and layer.config.rotation == "opq" and layer.config.num_coarse == 8
    cc, codes = layer.encode(torch.from_numpy(items))  # the file's quantizer, exactly
    packed = pack_sa_codes(cc.numpy(), codes.numpy(), faiss.extract_index_ivf(index).coarse_code_size(), 4)
    assert np.array_equal(packed, index.sa_encode(items))

    args = distill_from_faiss_file(tmp_path, items, queries, tmp_path / "start.faiss", epochs=5)
    _, exact = FlatIndex(torch.from_numpy(items), "ip").search(torch.from_numpy(queries), 10)

    def overlap(found: np.ndarray) -> float:
        return float(
            np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.tolist(), found.tolist(), strict=True)])
        )

    faiss.extract_index_ivf(index).nprobe = 2
    _, faiss_found = index.search(queries, 10)
    _, distilled_found = Searcher.load(tmp_path / "ix").search(queries, 10, nprobe=2)
    assert overlap(np.asarray(distilled_found)) > overlap(faiss_found)

    l2 = faiss.index_factory(DIM, "IVF8,PQ4x4")
    l2.train(items)
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    with pytest.raises(PoeemError, match="an inner-product or cosine index"):
        layer_from_faiss(tmp_path / "l2.faiss", DIM, None)
    result = CliRunner().invoke(app, [*args, "--num-subspaces", "8", "--replace"])
    assert "no layer flags but --rotation givens" in str(result.exception)


def stop_after_saved_states(
    monkeypatch: pytest.MonkeyPatch,
    n: int,
    layer: PoeemLayer,
    items: torch.Tensor,
    queries: torch.Tensor,
    cfg: DistillConfig,
    state: Path,
) -> None:
    """Distil with a checkpoint and stop (Ctrl-C) right after the n-th epoch's state is saved."""
    import poeem.training.distill as distill_module

    save, saved = distill_module._save_state, []

    def save_then_stop(*args: object) -> None:
        save(*args)
        saved.append(1)
        if len(saved) == n:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(distill_module, "_save_state", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            distill_index(layer, items, queries, cfg, progress=False, checkpoint=state)


def test_a_stopped_distillation_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items, queries = clustered(1200, 0), clustered(400, 1)
    cfg = DistillConfig(rounds=2, epochs=2, teacher_k=20)
    whole_layer = fitted_layer(items)
    stopped_layer = copy.deepcopy(whole_layer)
    whole = distill_index(whole_layer, items, queries, cfg, progress=False)

    state = tmp_path / "state.safetensors"
    stop_after_saved_states(monkeypatch, 3, stopped_layer, items, queries, cfg, state)
    resumed_layer = fitted_layer(items)  # a fresh process: the state comes from the file only
    resumed = distill_index(resumed_layer, items, queries, cfg, progress=False, checkpoint=state, resume=True)
    assert resumed.history == whole.history and resumed.best == whole.best
    assert torch.equal(resumed.codes, whole.codes) and torch.equal(resumed.coarse_codes, whole.coarse_codes)
    for a, b in zip(resumed_layer.state_dict().values(), whole_layer.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(PoeemError, match="other queries"):
        distill_index(fitted_layer(items), items, queries[:300], cfg, checkpoint=state, resume=True)


@pytest.mark.parametrize("best_codes", ["current", "start", "earlier round"])
def test_the_state_keeps_the_best_epochs_codes(tmp_path: Path, best_codes: str) -> None:
    from poeem.training.distill import _restore, _save_state

    items = clustered(300, 0)
    layer = fitted_layer(items)
    trained = [layer.codebooks, layer.coarse, *layer.givens.parameters()]
    optimizer = torch.optim.Adam(trained)
    start_codes = tuple(c.long() for c in layer.encode(items))
    current = (start_codes[0].flip(0), start_codes[1].flip(0))
    earlier = (start_codes[0].roll(1), start_codes[1].roll(1))
    codes = {"current": current, "start": start_codes, "earlier round": earlier}[best_codes]
    best = (1.5, [p.detach().clone() for p in trained], {"round": 1.0, "epoch": 0.0}, codes)
    start = ([p.detach().clone() for p in trained], start_codes, None)
    state = tmp_path / "state.safetensors"
    g = torch.Generator().manual_seed(0)
    _save_state(state, layer, optimizer, g, 4, [], best, current, {"x": 1}, start)
    _, _, got_best, got_codes, got_start = _restore(state, layer, optimizer, g, {"x": 1}, trained)
    for got, want in ((got_best[3], codes), (got_codes, current), (got_start[1], start_codes)):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert (got_best[3] is got_codes) == (best_codes == "current")  # one object, as when it was saved
    assert (got_best[3] is got_start[1]) == (best_codes == "start")


def test_the_cli_keeps_and_resumes_a_distillations_state(tmp_path: Path) -> None:
    np.save(tmp_path / "items.npy", clustered(1200, 0).numpy())
    np.save(tmp_path / "queries.npy", clustered(400, 1).numpy())
    args = ["distill", "--items", str(tmp_path / "items.npy"), "--queries", str(tmp_path / "queries.npy")]
    args += [
        "--num-coarse",
        "8",
        "--num-subspaces",
        "4",
        "--codebook-size",
        "16",
        "--out",
        str(tmp_path / "ix"),
    ]
    args += ["--rounds", "1", "--epochs", "1", "--teacher-k", "20", "--no-progress"]
    state = tmp_path / "ix.distill.safetensors"
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert "a stopped distillation's state" in str(result.exception)
    state.write_bytes(b"left by a stopped run")
    result = CliRunner().invoke(app, args)
    assert "pass --resume to continue it" in str(result.exception)
    state.unlink()
    result = CliRunner().invoke(app, [*args, "--temperature", "0"])  # the option reaches the config
    assert "distill.temperature" in str(result.exception) and not state.exists()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert Searcher.load(tmp_path / "ix").ntotal == 1200 and not state.exists()  # deleted once written
    result = CliRunner().invoke(app, args)  # refused before any work: nothing left behind
    assert "holds an index" in str(result.exception) and not state.exists()


def test_a_faiss_start_that_cannot_be_used_is_a_clear_error(tmp_path: Path) -> None:
    items = clustered(600, 0).numpy()
    with pytest.raises(PoeemError, match="an existing file"):
        layer_from_faiss(tmp_path / "missing.faiss", DIM, None)
    (tmp_path / "junk.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(PoeemError, match=r"a file written by faiss\.write_index"):
        layer_from_faiss(tmp_path / "junk.faiss", DIM, None)
    flat = faiss.IndexFlatIP(DIM)
    with pytest.raises(PoeemError, match=r"an IVF-PQ or IVF-RQ \(by residual\), PQ or RQ index"):
        layer_from_faiss(flat, DIM, None)
    pq = faiss.index_factory(DIM, "PQ4x4", faiss.METRIC_INNER_PRODUCT)
    pq.train(items)
    with pytest.raises(PoeemError, match="an index of the items' dim 32"):
        layer_from_faiss(pq, 32, None)
    with pytest.raises(PoeemError, match="givens"):
        layer_from_faiss(pq, DIM, "opq")
    layer = fitted_layer(torch.from_numpy(items))
    with pytest.raises(PoeemError, match=r"initialize_from codebooks: expected shape \(4, 16, 4\)"):
        layer.initialize_from(torch.eye(DIM), layer.coarse.detach(), torch.zeros(4, 8, 4))
    with pytest.raises(PoeemError, match="an orthogonal matrix"):
        layer.initialize_from(2 * torch.eye(DIM), layer.coarse.detach(), layer.codebooks.detach())


def test_an_index_made_worse_by_distillation_is_not_kept() -> None:
    items, queries = clustered(800, 8), clustered(300, 9)
    layer = fitted_layer(items, rotation="givens")
    start = copy.deepcopy(layer.state_dict())
    start_codes = layer.encode(items)
    lrs = {"codebook_lr": 5.0, "coarse_lr": 5.0, "rotation_lr": 5.0}  # wrecks the codewords
    wrecking = DistillConfig(rounds=1, epochs=2, teacher_k=20, **lrs)
    with pytest.warns(UserWarning, match="the starting index is kept"):
        result = distill_index(layer, items, queries, wrecking, progress=False)
    assert result.kept_start and result.guard["distilled"] < result.guard["start"]
    assert torch.equal(result.codes, start_codes[1].long())
    assert torch.equal(result.coarse_codes, start_codes[0].long())
    for name, value in layer.state_dict().items():
        assert torch.equal(value, start[name]), name


def test_an_index_improved_by_distillation_is_kept() -> None:
    items, queries = clustered(800, 4), clustered(300, 5)
    layer = fitted_layer(items, rotation="none")
    before = overlap_with_teacher(layer, items, queries, layer.encode(items))
    config = DistillConfig(rounds=1, epochs=4, teacher_k=20)
    result = distill_index(layer, items, queries, config, progress=False)
    assert not result.kept_start and result.guard["k"] == 10 and result.guard["stderr"] > 0
    # not significantly lower at the guard's depth, and closer to the model's own top-10
    assert result.guard["distilled"] - result.guard["start"] > -2 * result.guard["stderr"]
    assert overlap_with_teacher(layer, items, queries, (result.coarse_codes, result.codes)) > before


def test_the_guard_watches_the_depth_that_is_served() -> None:
    items, queries = clustered(600, 0), clustered(200, 1)
    with pytest.raises(PoeemError, match=r"distill\.guard_k: expected an integer >= 1 or None, got 0"):
        DistillConfig(guard_k=0)
    with pytest.raises(PoeemError, match="at most 600"):
        distill_index(fitted_layer(items), items, queries, DistillConfig(guard_k=601), progress=False)
    config = DistillConfig(rounds=1, epochs=1, teacher_k=20, guard_k=3)
    assert distill_index(fitted_layer(items), items, queries, config, progress=False).guard["k"] == 3
    cfg = tiny_config()  # a run's distillation guards the shallowest k it evaluates
    assert run_distill_config(DistillConfig(), cfg, 10_000).guard_k == min(cfg.eval.ks)
    assert run_distill_config(DistillConfig(guard_k=7), cfg, 10_000).guard_k == 7
    assert run_distill_config(DistillConfig(), cfg, 50).teacher_k == 50  # a small catalogue, ranked whole


def test_a_state_without_its_starting_index_is_refused_clearly(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    items, queries = clustered(600, 0), clustered(200, 1)
    cfg = DistillConfig(rounds=1, epochs=1, teacher_k=20)
    state = tmp_path / "state.safetensors"
    layer = fitted_layer(items)
    start = copy.deepcopy(layer)
    distill_index(layer, items, queries, cfg, progress=False, checkpoint=state)
    with safe_open(state, "pt") as f:  # rewrite it as an older poeem wrote it: no start
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".start." not in k}  # noqa: SIM118 (no __iter__)
        meta = f.metadata()
    meta["poeem"] = meta["poeem"].replace('"start_guard"', '"old_key"')
    save_file(tensors, state, metadata=meta)
    with pytest.raises(PoeemError, match="older poeem"):
        distill_index(start, items, queries, cfg, progress=False, checkpoint=state, resume=True)


def test_an_index_fitted_after_training_defaults_to_8_bit_codes() -> None:
    items = clustered(600, 3)
    assert new_layer(DIM, {"num_subspaces": 4, "num_coarse": 2}, items, False).config.codebook_size == 256
    assert new_layer(DIM, {"num_subspaces": 4, "codebook_size": 16}, items, False).config.codebook_size == 16
