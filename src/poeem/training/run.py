"""``poeem train``: data, model and trainer wired together into a run folder."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from poeem.data import InteractionData, load_data
from poeem.errors import PoeemError
from poeem.evaluation.report import compare_indexes
from poeem.model import TwoTowerModel
from poeem.runs import RunConfig, build_model, model_shapes, save_run, save_weights, write_metrics
from poeem.training.batches import PairBatches
from poeem.training.trainer import Trainer, resolve_device


def budget_of(model: TwoTowerModel, cfg: RunConfig) -> tuple[int, int, int]:
    """(coarse_K, D, K) for the FAISS baseline: the layer's, else the eval config's."""
    if model.index is not None:
        c = model.index.config
        return c.num_coarse, c.num_subspaces, c.codebook_size
    return cfg.eval.num_coarse, cfg.eval.num_subspaces, cfg.eval.codebook_size


def evaluate_model(
    model: TwoTowerModel, data: InteractionData, cfg: RunConfig, nprobes: tuple[int, ...] | None = None
) -> list[dict[str, Any]]:
    """The evaluation rows a run's config asks for (see :func:`compare_indexes`)."""
    return compare_indexes(
        model,
        data,
        cfg.eval.ks,
        nprobes or cfg.eval.nprobes,
        cfg.eval.faiss_baseline,
        budget_of(model, cfg),
        cfg.eval.opq_baseline,
        cfg.train.seed,
    )


def train_run(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False
) -> tuple[TwoTowerModel, dict[str, Any]]:
    """Train, checkpoint and evaluate; everything lands in ``run_dir``.

    With ``resume``, the run folder's own config is used and training continues from its
    checkpoint, exactly where it stopped.

    Returns:
        The trained model and the metrics written to ``metrics.json``.
    """
    run_dir = Path(run_dir)
    if resume:
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise PoeemError(
                "--resume",
                "a run folder with config.json",
                f"'{run_dir}'",
                "drop --resume to start a new run",
            )
        max_steps = cfg.train.max_steps
        cfg = RunConfig.from_dict(json.loads(saved.read_text()))
        cfg.train.max_steps = max_steps
    elif (run_dir / "model.safetensors").exists() or (run_dir / "checkpoint.safetensors").exists():
        raise PoeemError(
            "run folder",
            "a new or empty folder",
            f"'{run_dir}' holds a trained run",
            "pass --resume to continue it, or another --run-dir (nothing was overwritten)",
        )
    device = resolve_device(cfg.train.device)
    data = load_data(cfg.data)
    shapes = model_shapes(data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, shapes, torch.from_numpy(data.item_popularity())).to(device)
    save_run(run_dir, cfg, shapes)
    ks = cfg.eval.ks

    def periodic_eval(_: torch.nn.Module) -> dict[str, float]:
        rows = compare_indexes(model, data, ks, cfg.eval.nprobes[:1], faiss_baseline=False)
        return {
            f"{r['method']}/{name}": v
            for r in rows
            for name, v in r.items()
            if name.split("@")[0] in ("recall", "precision", "ndcg")
        }

    trainer = Trainer(model, cfg.train, run_dir, periodic_eval)
    if resume:
        trainer.resume()
    started = time.perf_counter()
    history = trainer.fit(
        PairBatches(data, cfg.train.batch_size, cfg.train.seed, device, cfg.model.random_negatives)
    )
    train_s = time.perf_counter() - started
    if model.index is not None and not model.index.is_initialized:
        warnings.warn(
            "training ended inside the Poeem warm start, so the index was fitted on the final "
            "item embeddings instead of trained jointly; lower warmup_steps or train longer",
            stacklevel=2,
        )
        features = torch.from_numpy(data.item_features) if data.item_features is not None else None
        model.index.initialize(model.all_item_embeddings(features), progress=cfg.train.progress)
    save_weights(run_dir, model)
    rows = evaluate_model(model, data, cfg)
    metrics = {
        "data": data.summary(),
        "steps": trainer.step,
        "train_s": train_s,
        "rows": rows,
        "history": history,
        "index_stats": model.index.stats() if model.index is not None else {},
    }
    write_metrics(run_dir, metrics)
    return model, metrics
