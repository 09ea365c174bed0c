import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run

from poeem import PoeemError
from poeem.data import DataConfig
from poeem.data.synthetic import synthetic_task
from poeem.model import ModelConfig, TwoTowerModel, in_batch_softmax
from poeem.model import loss as loss_module
from poeem.pipeline import EvalConfig, RunConfig, load_run, train_run
from poeem.training import PairBatches, TrainConfig, Trainer, build_optimizer


def test_in_batch_softmax_masks_duplicate_positives() -> None:
    # 2-d embeddings whose products are the scores [[2, 5, 0], [1, 1, 0], [0, 0, 3]]
    q = torch.tensor([[2.0, 5.0], [1.0, 1.0], [0.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    q = torch.cat([q, torch.tensor([[0.0], [0.0], [1.0]])], 1)
    x = torch.cat([x, torch.tensor([[0.0], [0.0], [3.0]])], 1)
    ids = torch.tensor([7, 7, 8])  # rows 0 and 1 share the positive item
    loss = in_batch_softmax(q, x, ids)
    expected = (
        -(
            torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
            + torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0]
            + torch.log_softmax(torch.tensor([0.0, 0.0, 3.0]), 0)[2]
        )
        / 3
    )
    torch.testing.assert_close(loss, expected)


def reference_in_batch_softmax(q, x, ids, log_q, offset):  # the plain-ops formulation
    scores = q @ x.T - (log_q if log_q is not None else 0)
    b = q.shape[0]
    target = torch.arange(b) + offset
    duplicate = ids.unsqueeze(0) == ids[offset : offset + b].unsqueeze(1)
    duplicate[torch.arange(b), target] = False
    return torch.nn.functional.cross_entropy(scores.masked_fill(duplicate, float("-inf")), target)


@pytest.mark.parametrize("offset, negatives, with_log_q", [(0, 0, False), (0, 7, True), (5, 3, True)])
@pytest.mark.parametrize("block_rows", [5, 64])  # 5: three row blocks, duplicates across them
@pytest.mark.parametrize("keep", [True, False])  # softmax blocks kept for backward, or recomputed
def test_fused_in_batch_softmax_matches_plain_ops(
    offset: int,
    negatives: int,
    with_log_q: bool,
    block_rows: int,
    keep: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(loss_module.BLOCK_BYTES, "cpu", block_rows * 4 * (12 + offset + 4 + negatives))
    monkeypatch.setattr(loss_module, "KEEP_BYTES", loss_module.KEEP_BYTES if keep else 0)
    g = torch.Generator().manual_seed(offset + negatives)
    b, total = 12, 12 + offset + 4 + negatives  # columns before and after this rank's positives
    ids = torch.randint(0, 9, (total,), generator=g)  # 9 ids: many duplicates
    log_q = torch.randn(total, generator=g) if with_log_q else None
    q, x = torch.randn(b, 6, generator=g), torch.randn(total, 6, generator=g)
    grads = []
    for fn in (in_batch_softmax, reference_in_batch_softmax):
        qq, xx = q.clone().requires_grad_(), x.clone().requires_grad_()
        loss = fn(qq, xx, ids, log_q, offset)
        (3 * loss).backward(retain_graph=True)
        first = (qq.grad.clone(), xx.grad.clone())
        loss.backward()  # a second backward of the same graph (kept blocks are spent by then)
        grads.append((loss.detach(), *first, qq.grad, xx.grad))
    for fused, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fused, plain)
    with pytest.raises(PoeemError, match="positives"):
        in_batch_softmax(q, x, ids[:-1])


def tiny_poeem_model(seed: int = 0, table_dtype: str = "float32") -> tuple[TwoTowerModel, PairBatches]:
    data = synthetic_task(num_pairs=4000, seed=seed)
    torch.manual_seed(seed)
    layer = {
        "num_coarse": 4,
        "num_subspaces": 4,
        "codebook_size": 16,
        "warmup_steps": 5,
        "buffer_size": 256,
        "kmeans_iters": 3,
    }
    config = ModelConfig(dim=16, temperature=0.1, poeem=layer, table_dtype=table_dtype)  # type: ignore[arg-type]
    model = TwoTowerModel(config, 10_000, 10_000)
    return model, PairBatches(data, 128, seed)


def test_loss_decreases_on_tiny_data() -> None:
    model, batches = tiny_poeem_model()
    cfg = TrainConfig(epochs=3, batch_size=128, lr=0.05, progress=False, checkpoint_every=0)
    first = float(model(batches.batch(0, 0))["task_loss"])
    Trainer(model, cfg).fit(batches)
    model.eval()
    last = np.mean([float(model(batches.batch(0, i))["task_loss"]) for i in range(5)])
    assert last < 0.7 * first
    assert model.index.is_initialized


@pytest.mark.parametrize(
    ("table_optimizer", "table_dtype"),
    [
        ("dense", "float32"),
        ("rowwise_adagrad", "float32"),
        ("sparse_adam", "float32"),
        ("rowwise_adagrad", "bfloat16"),
    ],
)
def test_resume_after_interruption_matches_uninterrupted(
    tmp_path: Path, table_optimizer: str, table_dtype: str
) -> None:
    cfg = TrainConfig(
        epochs=2,
        batch_size=128,
        lr=0.05,
        progress=False,
        checkpoint_every=7,
        log="none",
        table_optimizer=table_optimizer,  # type: ignore[arg-type]
    )
    straight, batches = tiny_poeem_model(table_dtype=table_dtype)
    Trainer(straight, cfg).fit(batches)

    interrupted, batches = tiny_poeem_model(table_dtype=table_dtype)
    Trainer(interrupted, TrainConfig(**{**cfg.__dict__, "max_steps": 3}), tmp_path).fit(
        batches
    )  # still warming up
    assert interrupted.index.phase_name == "warmup"
    resumed, batches = tiny_poeem_model(seed=0, table_dtype=table_dtype)
    trainer = Trainer(resumed, cfg, tmp_path)
    trainer.resume()
    assert trainer.step == 3
    trainer.fit(batches)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_train_run_writes_a_complete_run_folder(tmp_path: Path) -> None:
    cfg = RunConfig(
        data=DataConfig(kind="synthetic", num_pairs=3000),
        model=ModelConfig(
            dim=16,
            poeem={
                "num_coarse": 2,
                "num_subspaces": 4,
                "codebook_size": 16,
                "warmup_steps": 10,
                "buffer_size": 512,
            },
        ),
        train=TrainConfig(epochs=2, batch_size=256, progress=False, checkpoint_every=5),
        eval=EvalConfig(ks=(10,), nprobes=(1, 2)),
    )
    _, metrics = train_run(cfg, tmp_path / "run")
    for name in ("config.json", "model.safetensors", "checkpoint.safetensors", "metrics.json", "log.csv"):
        assert (tmp_path / "run" / name).is_file()
    methods = [(r["method"], r["nprobe"]) for r in metrics["rows"]]
    served = [("exact", 1), ("poeem", 1), ("poeem", 2), ("faiss-ivfpq", 1), ("faiss-ivfpq", 2)]
    assert methods == served  # the index as trained by default: no refit, no poeem-as-trained rows
    _, model = load_run(tmp_path / "run")
    assert model.index.is_initialized
    with pytest.raises(PoeemError, match="holds a trained run"):
        train_run(cfg, tmp_path / "run")


def test_resume_applies_safe_flags_and_refuses_the_others(tmp_path: Path) -> None:
    """Regression: --resume silently kept the stored --epochs/--lr/--device."""
    from typer.testing import CliRunner

    from poeem.cli import app

    run = tiny_run(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--run-dir", str(run), "--resume", "--lr", "0.5"])
    assert result.exit_code != 0
    assert "changes to train.lr" in str(result.exception) and "--epochs" in str(result.exception)
    result = runner.invoke(app, ["train", "--run-dir", str(run), "--resume", "--num-coarse", "8"])
    assert "changes to model.poeem.num_coarse" in str(result.exception)
    result = runner.invoke(app, ["train", "--run-dir", str(run), "--resume", "--no-poeem"])
    assert "changes to --no-poeem" in str(result.exception)
    # the layer's own values (stored or default) are no change: the command that trained it resumes it
    same = ["--num-coarse", "2", "--codebook-size", "16", "--rotation", "none", "--poeem"]
    result = runner.invoke(
        app, ["train", "--run-dir", str(run), "--resume", *same, "--epochs", "2", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    assert (
        "resume: train.epochs: 1 -> 2" in result.output
        and "resume: train.device: auto -> cpu" in result.output
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 16  # 2 epochs of 8 batches: the new --epochs was applied
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2


def test_index_lr_zero_freezes_the_index() -> None:
    """Regression: index_lr=0 fell back to lr."""
    model, _ = tiny_poeem_model()
    optimizer = build_optimizer(model, TrainConfig(lr=0.1, index_lr=0.0))
    # the towers at lr, the index (and its lists at their share of it) at 0
    lrs = [g["lr"] for g in optimizer.param_groups]
    assert lrs[0] == 0.1 and len(lrs) > 1 and set(lrs[1:]) == {0.0}
    with pytest.raises(PoeemError, match=r"train.index_lr: expected a finite number >= 0 or None, got -1"):
        TrainConfig(index_lr=-1)


def test_training_time_excludes_evaluation(tmp_path: Path) -> None:
    """Regression: train_s included the periodic evaluation passes."""
    model, batches = tiny_poeem_model()
    slow_eval_s = 0.3

    def slow_eval(_: object) -> dict[str, float]:
        time.sleep(slow_eval_s)
        return {"x": 1.0}

    cfg = TrainConfig(epochs=1, batch_size=128, progress=False, checkpoint_every=0, eval_every=10, log="none")
    trainer = Trainer(model, cfg, None, slow_eval)
    trainer.fit(batches)
    assert len(trainer.history) == 4 and trainer.eval_s >= 4 * slow_eval_s


def test_seed_does_not_change_the_data() -> None:
    """Regression: --seed also re-drew the data split; --data-seed does that now."""
    from typer.testing import CliRunner

    import poeem.pipeline as pipeline
    from poeem.cli import app

    seen = []
    original = pipeline.train_run
    pipeline.train_run = lambda cfg, run_dir, resume: seen.append(cfg) or (None, {"rows": []})
    try:
        CliRunner().invoke(app, ["train", "--seed", "7"], catch_exceptions=False)
        CliRunner().invoke(app, ["train", "--data-seed", "3"], catch_exceptions=False)
    finally:
        pipeline.train_run = original
    assert (seen[0].train.seed, seen[0].data.seed) == (7, 0)
    assert (seen[1].train.seed, seen[1].data.seed) == (0, 3)


def test_a_lists_ceiling_without_lists_is_said_not_skipped(tmp_path: Path) -> None:
    """Asking for the lists' ceiling of a model without an IVF index warns instead of printing
    a table that silently lacks the rows."""
    from poeem.data import load_data
    from poeem.evaluation.report import compare_indexes

    cfg, model = load_run(tiny_run(tmp_path))
    model.index = None
    with pytest.warns(UserWarning, match="no lists-ceiling rows"):
        rows = compare_indexes(
            model, load_data(cfg.data), (10,), (1,), faiss_baseline=False, lists_ceiling=True
        )
    assert [r["method"] for r in rows] == ["exact"]


def test_a_tower_built_without_its_table_draws_any_rows_of_the_same_table() -> None:
    """What a rank of a sharded run draws: its rows of the table one process would hold, while
    the global random state moves on as it would (so every other parameter is the same too)."""
    from poeem.model.towers import Tower

    torch.manual_seed(5)
    dense = Tower(1001, 5, init_std=0.1).embedding.weight.detach()
    after = torch.rand(3)
    torch.manual_seed(5)
    meta = Tower(1001, 5, init_std=0.1, table_on_meta=True)
    assert torch.equal(torch.rand(3), after)
    assert meta.embedding.weight.is_meta
    whole, part = torch.empty(1001, 5), torch.empty(400, 5)
    meta.table_rows(0, whole)
    meta.table_rows(300, part)
    assert torch.equal(whole, dense) and torch.equal(part, dense[300:700])
