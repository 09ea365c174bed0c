from pathlib import Path

import numpy as np
import pytest
import torch

from poeem import PoeemError
from poeem.data import DataConfig
from poeem.data.synthetic import synthetic_task
from poeem.model import ModelConfig, TwoTowerModel, in_batch_softmax
from poeem.pipeline import EvalConfig, RunConfig, load_run, train_run
from poeem.training import PairBatches, TrainConfig, Trainer


def test_in_batch_softmax_masks_duplicate_positives() -> None:
    scores = torch.tensor([[2.0, 5.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    ids = torch.tensor([7, 7, 8])  # rows 0 and 1 share the positive item
    loss = in_batch_softmax(scores, ids)
    expected = (
        -(
            torch.log_softmax(torch.tensor([2.0, 0.0]), 0)[0]
            + torch.log_softmax(torch.tensor([1.0, 0.0]), 0)[0]
            + torch.log_softmax(torch.tensor([0.0, 0.0, 3.0]), 0)[2]
        )
        / 3
    )
    torch.testing.assert_close(loss, expected)
    # logQ correction subtracts log q of each column's item
    log_q = torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(in_batch_softmax(scores, ids, log_q), in_batch_softmax(scores - log_q, ids))


def tiny_poeem_model(seed: int = 0) -> tuple[TwoTowerModel, PairBatches]:
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
    model = TwoTowerModel(ModelConfig(dim=16, temperature=0.1, poeem=layer), 10_000, 10_000)
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


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=2, batch_size=128, lr=0.05, progress=False, checkpoint_every=7, log="none")
    straight, batches = tiny_poeem_model()
    Trainer(straight, cfg).fit(batches)

    interrupted, batches = tiny_poeem_model()
    Trainer(interrupted, TrainConfig(**{**cfg.__dict__, "max_steps": 3}), tmp_path).fit(
        batches
    )  # still warming up
    assert interrupted.index.phase_name == "warmup"
    resumed, batches = tiny_poeem_model(seed=0)
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
    assert methods == [("exact", 1), ("poeem", 1), ("poeem", 2), ("faiss-ivfpq", 1), ("faiss-ivfpq", 2)]
    _, model = load_run(tmp_path / "run")
    assert model.index.is_initialized
    with pytest.raises(PoeemError, match="holds a trained run"):
        train_run(cfg, tmp_path / "run")
