"""torch.distributed on CPU (gloo, spawned on localhost): the warm start, DDP training with
cross-rank negatives, resume across world sizes, sharded export and the torchrun CLI."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import cli, run_ranks

from poeem import PoeemLayer, Searcher
from poeem.data.synthetic import synthetic_task
from poeem.model import ModelConfig, TwoTowerModel
from poeem.pipeline import export_run, load_run
from poeem.training import PairBatches, TrainConfig, Trainer

BATCH = 64
LAYER = {
    "num_coarse": 4,
    "num_subspaces": 4,
    "codebook_size": 16,
    "warmup_steps": 3,
    "buffer_size": 256,  # filled by steps 4-7, so k-means runs at step 7
    "kmeans_iters": 5,
}


# ------------------------------------------------------------------ warm start
def warm_start_worker(out: str) -> None:
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # every rank sees different items
    layer = PoeemLayer(
        dim=8, num_subspaces=2, codebook_size=8, num_coarse=2, warmup_steps=1, buffer_size=48, kmeans_iters=3
    )
    batches = [torch.randn(8 + 4 * rank, 8) for _ in range(4)]  # uneven batch sizes per rank
    for b in batches:
        layer(b)
    torch.save(
        {
            "codebooks": layer.codebooks.detach(),
            "coarse": layer.coarse.detach(),
            "phase": layer.phase_name,
            "batches": batches,
        },
        f"{out}/rank{rank}.pt",
    )


def test_ranks_share_one_index(tmp_path: Path) -> None:
    run_ranks(warm_start_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["phase"] == r1["phase"] == "quantize"
    assert torch.equal(r0["codebooks"], r1["codebooks"]) and torch.equal(r0["coarse"], r1["coarse"])
    # the buffer held both ranks' items: fitting one layer on them gives the same index
    rows = torch.cat([torch.cat([a, b]) for a, b in zip(r0["batches"][1:], r1["batches"][1:], strict=True)])
    single = PoeemLayer(
        dim=8, num_subspaces=2, codebook_size=8, num_coarse=2, warmup_steps=0, buffer_size=48, kmeans_iters=3
    )
    single.initialize(rows[:48])
    torch.testing.assert_close(single.codebooks.detach(), r0["codebooks"])


def routing_worker(out: str) -> None:
    """Each rank routes its half of 8 queries, whose positives lie in 4 of the 8 lists."""
    rank = dist.get_rank()
    torch.manual_seed(0)
    layer = PoeemLayer(
        dim=8, num_subspaces=2, codebook_size=8, num_coarse=8, warmup_steps=0, buffer_size=64, kmeans_iters=2
    )
    layer.initialize(torch.randn(64, 8))
    q = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))[4 * rank : 4 * rank + 4]
    targets = torch.arange(4 * rank, 4 * rank + 4)
    layer.config.routing_lists = "batch"
    sampled = layer.routing_loss(q, targets)
    layer.config.routing_lists = "all"
    torch.save({"sampled": sampled, "full": layer.routing_loss(q, targets)}, f"{out}/rank{rank}.pt")


def test_routing_samples_the_lists_of_every_ranks_batch(tmp_path: Path) -> None:
    run_ranks(routing_worker, str(tmp_path))
    for rank in (0, 1):
        losses = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(losses["sampled"], losses["full"])  # both ranks' lists: all 8


# -------------------------------------------------------------------- training
def train_worker(
    out: str,
    steps: int,
    cross_rank: bool,
    run_dir: str | None,
    resume: bool,
    table_optimizer: str = "dense",
    table_dtype: str = "float32",
    catalogue: bool = False,
) -> None:
    """Train the tiny model to ``steps``; save each rank's state and the index after the warm start.
    With ``catalogue`` the warm start fits a uniform sample of the catalogue, embedded by the model."""
    data = synthetic_task(num_pairs=4000, seed=0)
    torch.manual_seed(0)
    config = ModelConfig(
        dim=16,
        temperature=0.1,
        poeem=LAYER,
        cross_rank_negatives=cross_rank,
        table_dtype=table_dtype,  # type: ignore[arg-type]
    )
    model = TwoTowerModel(config, data.num_queries, data.num_items)
    if catalogue:
        model.warm_start_on_catalogue()
    cfg = TrainConfig(
        epochs=1,
        batch_size=BATCH,
        lr=0.05,
        progress=False,
        log="none",
        checkpoint_every=0,
        max_steps=steps,
        table_optimizer=table_optimizer,  # type: ignore[arg-type]
    )
    trainer = Trainer(model, cfg, Path(run_dir) if run_dir else None)
    if resume:
        trainer.resume()
    trainer.fit(PairBatches(data, BATCH, 0))
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(dict(model.state_dict()), f"{out}/rank{rank}.pt")


def states(out: Path, world: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, torch.Tensor]]:
    """One process with batch B: the state after the warm start (step 8) and at step 12."""
    out = {}
    for steps in (8, 12):
        folder = tmp_path_factory.mktemp(f"single{steps}")
        train_worker(str(folder), steps, True, None, False)
        out[str(steps)] = states(folder, 1)[0]
    return out


@pytest.mark.parametrize("steps", [8, 12])
def test_two_ranks_of_half_batch_train_like_one_rank(
    tmp_path: Path, single_rank: dict[str, dict[str, torch.Tensor]], steps: int
) -> None:
    run_ranks(train_worker, str(tmp_path), steps, True, None, False)
    r0, r1 = states(tmp_path, 2)
    assert r0["index.phase"] == 2  # past the warm start: k-means ran at step 7
    assert int((r0["index.trained.step"] >= 0).sum()) > 0  # both ranks' items remembered alike
    for name in r0:  # replicas identical, codebooks and trained codes included
        assert torch.equal(r0[name], r1[name]), name
    # 2 ranks x B/2 with gathered negatives = 1 rank x B, up to float summation order (1.2e-7 seen)
    assert max_difference(r0, single_rank[str(steps)]) < 1e-5


def test_two_ranks_fit_the_lists_one_process_fits_on_the_catalogue(tmp_path: Path) -> None:
    single = tmp_path / "single"
    single.mkdir()
    train_worker(str(single), 4, True, None, False, catalogue=True)  # warm start at step 4
    run_ranks(train_worker, str(tmp_path), 4, True, None, False, "dense", "float32", True)
    r0, r1 = states(tmp_path, 2)
    one = states(single, 1)[0]
    assert r0["index.phase"] == one["index.phase"] == 2  # fitted at once, no collect phase
    for name in ("index.coarse", "index.codebooks"):
        assert torch.equal(r0[name], r1[name])
        # the same sampled items, embedded by models equal up to float summation order
        assert float((r0[name] - one[name]).abs().max()) < 1e-4, name


@pytest.mark.parametrize(
    ("table_optimizer", "table_dtype"),
    [("rowwise_adagrad", "float32"), ("sparse_adam", "float32"), ("rowwise_adagrad", "bfloat16")],
)
def test_two_ranks_with_sparse_tables_train_like_one_rank(
    tmp_path: Path, table_optimizer: str, table_dtype: str
) -> None:
    """Sparse table gradients are averaged over ranks (gloo's sparse all-reduce) like dense ones."""
    single = tmp_path / "single"
    single.mkdir()
    train_worker(str(single), 12, True, None, False, table_optimizer, table_dtype)
    run_ranks(train_worker, str(tmp_path), 12, True, None, False, table_optimizer, table_dtype)
    r0, r1 = states(tmp_path, 2)
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert r0["item_tower.embedding.weight"].dtype == getattr(torch, table_dtype)
    assert max_difference(r0, states(single, 1)[0]) < 1e-5  # bfloat16 too: the ranks round alike


def test_without_cross_rank_negatives_the_ranks_train_another_model(
    tmp_path: Path, single_rank: dict[str, dict[str, torch.Tensor]]
) -> None:
    run_ranks(train_worker, str(tmp_path), 8, False, None, False)
    r0, r1 = states(tmp_path, 2)
    assert max_difference(r0, r1) == 0
    assert max_difference(r0, single_rank["8"]) > 1e-3  # each rank saw only B/2 negatives


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_across_world_sizes(
    tmp_path: Path, single_rank: dict[str, dict[str, torch.Tensor]], first: int, then: int
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # stop at step 5, mid-collect: half the warm start's rows went by, each item held once
    run_ranks(train_worker, str(tmp_path), 5, True, str(run_dir), False, world=first)
    collected = states(tmp_path, 1)[0]
    assert int(collected["index.buffer_seen"]) == 2 * BATCH
    held = collected["index.buffer_ids"][: int(collected["index.buffer_count"])]
    assert 0 < held.shape[0] == held.unique().shape[0] <= 2 * BATCH  # each item once
    run_ranks(train_worker, str(tmp_path), 12, True, str(run_dir), True, world=then)
    assert max_difference(states(tmp_path, 1)[0], single_rank["12"]) < 1e-5


# ---------------------------------------------------------------------- export
def export_worker(run_dir: str, out: str) -> None:
    export_run(run_dir, out)


def file_hashes(directory: Path) -> dict[str, str]:
    return json.loads((directory / "manifest.json").read_text())["sha256"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    cli(
        "train",
        "--run-dir",
        str(run_dir),
        *TINY_RUN,
        "--max-steps",
        "12",
    )
    return run_dir


def test_sharded_export_is_byte_identical(tmp_path: Path, trained_run: Path) -> None:
    export_run(trained_run, tmp_path / "single")
    run_ranks(export_worker, str(trained_run), str(tmp_path / "sharded"))
    single, sharded = Searcher.load(tmp_path / "single"), Searcher.load(tmp_path / "sharded")
    assert single.ntotal == sharded.ntotal == single.tensors.codes.shape[0]
    assert file_hashes(tmp_path / "single") == file_hashes(tmp_path / "sharded")  # FAISS file included


# ------------------------------------------------------------------------- CLI
TINY_RUN = (
    "--data",
    "synthetic",
    "--num-pairs",
    "4000",
    "--dim",
    "16",
    "--poeem",
    "--num-coarse",
    "4",
    "--num-subspaces",
    "4",
    "--codebook-size",
    "16",
    "--warmup-steps",
    "3",
    "--buffer-size",
    "256",
    "--batch-size",
    str(BATCH),
    "--no-progress",
    "--logger",
    "none",
)


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The run of ``trained_run`` trained by 2 ranks under torchrun, and what it printed."""
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    done = cli("train", "--run-dir", str(run_dir), *TINY_RUN, "--max-steps", "12", torchrun=True)
    return run_dir, done.stdout


def test_torchrun_trains_and_exports_through_the_cli(tmp_path: Path, torchrun_run: tuple[Path, str]) -> None:
    run_dir, stdout = torchrun_run
    assert stdout.count("run folder:") == 1  # rank 0 alone reports
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 12 and {r["method"] for r in metrics["rows"]} >= {"exact", "poeem"}
    done = cli("export", str(run_dir), "--out", str(tmp_path / "index"), torchrun=True)
    assert done.stdout.count("exported") == 1
    shapes = json.loads((run_dir / "config.json").read_text())["shapes"]
    assert Searcher.load(tmp_path / "index").ntotal == shapes["num_items"]


def test_nproc_relaunches_through_torchrun(tmp_path: Path) -> None:
    done = cli("train", "--run-dir", str(tmp_path), *TINY_RUN, "--max-steps", "4", "--nproc", "2")
    assert "launching 2 processes" in done.stdout and done.stdout.count("run folder:") == 1


def test_the_default_serves_the_same_index_in_one_process_and_under_torchrun(
    trained_run: Path, torchrun_run: tuple[Path, str]
) -> None:
    """No refit by default: the same command in one process and in 2 gloo ranks stores and
    serves the index as trained."""
    served = []
    for run_dir in (trained_run, torchrun_run[0]):  # one process, two gloo ranks
        assert json.loads((run_dir / "config.json").read_text())["train"]["refit"] is None
        assert "refit" not in json.loads((run_dir / "metrics.json").read_text())
        assert not (run_dir / "index_as_trained.safetensors").exists()
        served.append(load_run(run_dir)[1].index)
    assert served[0].config == served[1].config and served[0].config.quantizer == "pq"
    # 2 ranks of half the batch train like one rank: the same codebooks, up to summation order
    torch.testing.assert_close(served[0].codebooks, served[1].codebooks, rtol=0, atol=1e-4)


def test_batch_size_must_split_across_ranks(tmp_path: Path) -> None:
    tiny = [arg if arg != str(BATCH) else "63" for arg in TINY_RUN]
    done = cli("train", "--run-dir", str(tmp_path), *tiny, "--max-steps", "2", torchrun=True, ok=False)
    assert "a multiple of the number of processes (2)" in done.stderr


def test_nproc_must_be_positive(tmp_path: Path) -> None:
    done = cli("train", "--run-dir", str(tmp_path), *TINY_RUN, "--nproc", "0", ok=False)
    assert "--nproc" in done.stderr and "a positive integer" in done.stderr


# ------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_and_export_match_the_cpu_codes(tmp_path: Path) -> None:
    data = synthetic_task(num_pairs=4000, seed=0)
    torch.manual_seed(0)
    model = TwoTowerModel(ModelConfig(dim=16, poeem=LAYER), data.num_queries, data.num_items).cuda()
    cfg = TrainConfig(epochs=1, batch_size=BATCH, lr=0.05, progress=False, device="cuda", max_steps=12)
    Trainer(model, cfg).fit(PairBatches(data, BATCH, 0, device="cuda"))
    x = model.all_item_embeddings()
    gpu_codes = model.index.encode(x)[1].cpu()
    cpu_codes = model.cpu().index.encode(x.cpu())[1]
    assert (gpu_codes == cpu_codes).float().mean() > 0.99  # ties may break differently


def test_epoch_length_depends_on_the_global_batch_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: 256 * 7 + 1 pairs made 8 batches on 1 process and 7 on 2, so a run resumed on
    another world size mapped step 8 to another batch."""
    from poeem import distributed as dist_helpers
    from poeem.data import DataConfig, load_data
    from poeem.training.batches import PairBatches

    data = load_data(DataConfig(kind="synthetic", num_pairs=256 * 7 + 1))
    assert data.num_train == 256 * 7 + 1
    one = PairBatches(data, 256, seed=3)

    def batches_of(rank: int) -> PairBatches:
        monkeypatch.setattr(dist_helpers, "world_size", lambda: 2)
        monkeypatch.setattr(dist_helpers, "rank", lambda: rank)
        return PairBatches(data, 256, seed=3)

    halves = [batches_of(0), batches_of(1)]
    assert len(one) == len(halves[0]) == 8
    for epoch in range(2):
        for step in range(8):
            whole = one.batch(epoch, step)["query_ids"]
            split = torch.cat([h.batch(epoch, step)["query_ids"] for h in halves])
            if step < 7:
                assert torch.equal(whole, split)
            else:  # the one leftover pair is shorter than the world: the epoch's first 2 pairs
                assert whole.numel() == 1 and torch.equal(split, one.batch(epoch, 0)["query_ids"][:2])
