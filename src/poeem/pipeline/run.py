"""A run end to end: data, model and trainer wired into a run folder; evaluation; export."""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from poeem import distributed
from poeem.data import InteractionData, load_data
from poeem.errors import PoeemError
from poeem.evaluation.report import compare_indexes, learned_index_rows
from poeem.export.item_codes import EXPORT_DEFAULT, FromTraining, check_from_training, item_codes
from poeem.index.config import PoeemConfig
from poeem.index.refit import Refit, refit_layer
from poeem.model import RetrievalModel
from poeem.model.config import TextConfig
from poeem.model.text import TextTwoTowerModel
from poeem.pipeline.config import RunConfig, run_options
from poeem.pipeline.run_dir import (
    RunArtifacts,
    build_model,
    load_run,
    model_shapes,
    read_artifacts,
    read_config,
    save_config,
    save_run,
    save_weights,
    write_metrics,
)
from poeem.search.searcher import Searcher
from poeem.training.batches import PairBatches
from poeem.training.distill import DistillConfig
from poeem.training.trainer import Trainer, resolve_device


def attach_data(model: RetrievalModel, data: InteractionData, progress: bool = True) -> RetrievalModel:
    """Give a text model its data's texts (frozen sides are embedded once, and cached); other
    models are returned as they are."""
    if isinstance(model, TextTwoTowerModel):
        if data.query_texts is None or data.item_texts is None:
            raise PoeemError(
                "text towers", "data with texts", f"{data.name} (ids only)", "train with --data beir"
            )
        model.attach_texts(data.query_texts, data.item_texts, progress)
    return model


def budget_of(model: RetrievalModel, cfg: RunConfig) -> tuple[int, int, int]:
    """(coarse_K, D, K) for the FAISS baseline: the layer's, else the eval config's."""
    if model.index is not None:
        c = model.index.config
        return c.num_coarse, c.num_subspaces, c.codebook_size
    return cfg.eval.num_coarse, cfg.eval.num_subspaces, cfg.eval.codebook_size


def evaluate_model(
    model: RetrievalModel, data: InteractionData, cfg: RunConfig, nprobes: tuple[int, ...] | None = None
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
        cfg.eval.lists_ceiling,
    )


def resume_config(
    run_dir: Path,
    overrides: dict[str, dict[str, Any]],
    layer: dict[str, Any] | None = None,
    text: dict[str, Any] | None = None,
    poeem: bool | None = None,
) -> tuple[RunConfig, list[str]]:
    """The stored config of a run, with the settings that are safe to change on resume applied.

    Args:
        run_dir: a run folder with ``config.json``.
        overrides: settings the user passed, by section, e.g. ``{"train": {"epochs": 5}}``.
        layer, text: index-layer and text-tower settings the user passed; they must equal
            the stored ones (the model of a run cannot change).
        poeem: whether the user asked for a layer (True), for none (False), or did not say.

    Returns:
        The config, and one ``"train.epochs: 3 -> 5"`` line per applied change.

    Raises:
        PoeemError: an override that would change the model, the data or the batches.
    """
    if not (run_dir / "config.json").is_file():
        raise PoeemError(
            "--resume", "a run folder with config.json", f"'{run_dir}'", "drop --resume to start a new run"
        )
    cfg, _ = read_config(run_dir)
    stored = cfg.to_dict()
    safe = {(o.section, o.name): o.flag for o in run_options() if o.resume}
    refused = [
        f"{section}.{key}"
        for section, values in overrides.items()
        for key, value in values.items()
        if (section, key) not in safe and stored[section].get(key) != value
    ]
    for name, given in (("poeem", layer), ("text", text)):
        kept = _with_defaults(name, stored["model"]) if given else {}
        refused += [f"model.{name}.{key}" for key, value in (given or {}).items() if kept.get(key) != value]
    if poeem is not None and poeem != (stored["model"].get("poeem") is not None):
        refused.append("--poeem" if poeem else "--no-poeem")
    if refused:
        raise PoeemError(
            "--resume",
            f"only settings that are safe to change on a resumed run ({', '.join(sorted(safe.values()))}), "
            "or the run's own values",
            f"changes to {', '.join(refused)}",
            "drop those flags to continue the run as it was configured, or start a new run "
            "in another --run-dir",
        )
    applied = []
    raw = copy.deepcopy(stored)
    for section, values in overrides.items():
        for key, value in values.items():
            if raw[section].get(key) != value:
                before = raw[section].get(key)
                applied.append(f"{section}.{key}: {'default' if before is None else before} -> {value}")
                raw[section][key] = value
    return RunConfig.from_dict(raw), applied


def _with_defaults(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """The stored model config's layer ("poeem") or text towers ("text"), defaults filled in."""
    stored = model.get(name)
    if stored is None:
        return {}
    if name == "poeem":
        return PoeemConfig(**{"dim": model["dim"], **stored}).to_dict()
    return asdict(TextConfig(**stored))


def train_run(
    cfg: RunConfig, run_dir: str | Path, resume: bool = False
) -> tuple[RetrievalModel, dict[str, Any]]:
    """Train, checkpoint and evaluate; everything lands in ``run_dir``.

    Args:
        cfg: the run's config; with ``resume``, the config :func:`resume_config` returned.
        run_dir: the run folder; it must not hold a trained run unless ``resume``.
        resume: continue from the folder's checkpoint, exactly where it stopped.

    Under ``torchrun`` every rank trains its share of each batch (see
    :class:`~poeem.training.batches.PairBatches`); rank 0 writes the folder and evaluates.

    Returns:
        The trained model and the metrics written to ``metrics.json`` (empty on ranks other
        than 0); ``train_s`` is the training time without the periodic evaluations.
    """
    run_dir = Path(run_dir)
    if not resume and (
        (run_dir / "model.safetensors").exists() or (run_dir / "checkpoint.safetensors").exists()
    ):
        raise PoeemError(
            "run folder",
            "a new or empty folder",
            f"'{run_dir}' holds a trained run",
            "pass --resume to continue it, or another --run-dir (nothing was overwritten)",
        )
    if cfg.data.path and Path(cfg.data.path).exists():  # the run must find its data from anywhere
        cfg = replace(cfg, data=replace(cfg.data, path=str(Path(cfg.data.path).resolve())))
    encoder = (cfg.model.text or {}).get("encoder")
    if encoder and Path(encoder).is_dir():  # and its text encoder (an index names it too)
        text = {**(cfg.model.text or {}), "encoder": str(Path(encoder).resolve())}
        cfg = replace(cfg, model=replace(cfg.model, text=text))
    device = distributed.setup(resolve_device(cfg.train.device))
    cfg = resolve_refit(cfg)
    _check_distill(cfg)
    data = load_data(cfg.data)
    shapes = model_shapes(data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, shapes, torch.from_numpy(data.item_popularity())).to(device)
    if model.index is not None:
        check_catalogue(model.index.config, data.num_items, data.name)
    attach_data(model, data, cfg.train.progress and distributed.is_main())
    artifacts = RunArtifacts.of(data)
    if distributed.is_main():
        save_run(run_dir, cfg, shapes, artifacts)
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
    batches = PairBatches(data, cfg.train.batch_size, cfg.train.seed, device, cfg.model.random_negatives)
    if resume:
        trainer.resume()
    if distributed.is_main():
        kind = "two-tower model with a Poeem layer" if cfg.model.poeem is not None else "two-tower model"
        span = f"{cfg.train.epochs} epochs" if cfg.train.max_steps is None else "--max-steps"
        print(
            f"training a {kind} on {data.summary()}; {trainer.total_steps(len(batches))} steps of "
            f"batch {cfg.train.batch_size} ({span}) into {run_dir}/",
            flush=True,
        )
    started = time.perf_counter()
    history = trainer.fit(batches)
    train_s = time.perf_counter() - started - trainer.eval_s
    if model.index is not None and not model.index.is_initialized:
        warnings.warn(
            "training ended inside the Poeem warm start, so the index was fitted on the final "
            "item embeddings instead of trained jointly; lower warmup_steps or train longer",
            stacklevel=2,
        )
        model.index.initialize(
            model.all_item_embeddings(artifacts.item_features), progress=cfg.train.progress
        )
    if not distributed.is_main():
        return model, {}
    trained_index = model.index
    # the trained model is saved before the stages after training, so that none loses it
    if cfg.train.refit is not None:  # until the refit is saved, the run serves its index as trained
        save_config(run_dir, replace(cfg, train=replace(cfg.train, refit=None)), shapes)
    save_weights(run_dir, model)
    try:
        refit, items, as_trained = _refit_after_training(model, data, artifacts, cfg)
        distilled = _distill_after_training(model, data, artifacts, cfg, items)
    except (PoeemError, RuntimeError, ValueError) as err:
        finish = f"'poeem distill {run_dir} --out INDEX" + (
            f" --refit {cfg.train.refit}'" if cfg.train.refit else "'"
        )
        raise PoeemError(
            "the index after training",
            "a refit or distillation that completes",
            f"{type(err).__name__}: {err}",
            f"training finished and is saved in '{run_dir}' with its index as trained: export that "
            f"with 'poeem export {run_dir} --out INDEX', or finish with {finish}",
        ) from err
    if refit or distilled:
        save_weights(run_dir, model, trained_index if refit else None)  # both indexes of a refit
        save_config(run_dir, cfg, shapes)
    evaluated = ["exact search"] + ["the index the run serves"] * (model.index is not None)
    evaluated += ["FAISS IVF-PQ built on the item embeddings"] * cfg.eval.faiss_baseline
    print(f"evaluating {', '.join(evaluated)} ...", flush=True)  # a line even off a terminal
    rows = evaluate_model(model, data, cfg) + as_trained
    metrics = {
        "data": data.summary(),
        "steps": trainer.step,
        "train_s": train_s,
        "eval_during_training_s": trainer.eval_s,
        "rows": rows,
        "history": history,
        "index_stats": model.index.stats() if model.index is not None else {},
    }
    if refit:
        metrics["refit"] = refit
    if distilled:
        metrics["distill"] = distilled
    write_metrics(run_dir, metrics)
    return model, metrics


def check_catalogue(layer: PoeemConfig, num_items: int, name: str = "the data") -> None:
    """Refuse, before the first step, a catalogue too small for the layer: its k-means (at the
    warm start's end, and in a refit) needs at least max(K, coarse_K) items."""
    needed = max(layer.codebook_size, layer.num_coarse)
    if num_items < needed:
        raise PoeemError(
            "catalogue",
            f"at least max(K, coarse_K) = {needed} items, for the layer's k-means",
            f"{num_items} items in {name}",
            f"lower --codebook-size and --num-coarse to at most {num_items}, or train without --poeem",
        )


def after_training_seconds(metrics: dict[str, Any]) -> float:
    """Seconds a run spent on its index after training (the refit and the distillation, from
    ``train_run``'s metrics): part of the build time of the index it serves."""
    return sum(metrics.get(stage, {}).get("seconds", 0.0) for stage in ("refit", "distill"))


DEFAULT_DISTILL_EPOCHS = 10  # per round, when a text or refitted run leaves train.distill_epochs unset


def distill_epochs(cfg: RunConfig) -> int:
    """Epochs per round of index distillation after training: ``train.distill_epochs``, or when
    it is None, :data:`DEFAULT_DISTILL_EPOCHS` for a refitted layer (``train.refit``), which
    gains most from it, and 0 otherwise: by default a run serves its index as trained, ready when
    training ends, in one process and under torchrun alike (docs/design.md, "Codebook size")."""
    if cfg.train.distill_epochs is not None:
        return cfg.train.distill_epochs
    return DEFAULT_DISTILL_EPOCHS if cfg.model.poeem is not None and cfg.train.refit else 0


def run_distill_config(config: DistillConfig, cfg: RunConfig, num_items: int) -> DistillConfig:
    """``config`` for a run: unless set, its guard watches the shallowest depth the run
    evaluates (``eval.ks``), and a catalogue smaller than the teacher's top-k is ranked whole; a
    run refitted after training (``train.refit``) keeps its trained lists
    (:meth:`DistillConfig.keeping_lists`)."""
    guard_k = config.guard_k or min(min(cfg.eval.ks), num_items)
    config = replace(config, guard_k=guard_k, teacher_k=min(config.teacher_k, num_items))
    return config.keeping_lists() if cfg.train.refit else config


def resolve_refit(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``train.refit`` made concrete, as the run stores it. The default (None)
    stays None in one process and under torchrun alike; an explicit "auto" becomes "rq" for a
    run with a layer in one process, else None (under torchrun it says how to refit afterwards)."""
    if cfg.train.refit != "auto":
        return cfg
    layer = cfg.model.poeem is not None
    if layer and distributed.is_active() and distributed.is_main():
        print(
            "the index is not refitted under torchrun: after training, run "
            "'poeem distill RUN_DIR --refit rq --out INDEX' (one process) for the most accurate index",
            flush=True,
        )
    refit = "rq" if layer and not distributed.is_active() else None
    return replace(cfg, train=replace(cfg.train, refit=refit))


def _check_distill(cfg: RunConfig) -> None:
    """Refuse ``train.distill_epochs`` and ``train.refit`` before training where they cannot run
    after it."""
    for flag, asked, after in (
        ("--distill-epochs", cfg.train.distill_epochs, "'poeem distill RUN_DIR'"),
        ("--refit", cfg.train.refit, f"'poeem distill RUN_DIR --refit {cfg.train.refit}'"),
    ):
        if not asked:
            continue
        if cfg.model.poeem is None:
            raise PoeemError(
                flag,
                "a run with a Poeem layer (--poeem)",
                "a baseline run",
                f"add --poeem, or build an index for the trained run with {after}",
            )
        if distributed.is_active():
            raise PoeemError(
                flag, "one process", "torchrun", f"train without it, then run {after} (one process)"
            )


def _refit_after_training(
    model: RetrievalModel, data: InteractionData, artifacts: RunArtifacts, cfg: RunConfig
) -> tuple[dict[str, Any], torch.Tensor | None, list[dict[str, Any]]]:
    """Replace the trained layer by its refit (``train.refit``). Returns what it did ({} if
    nothing), the (num_items, dim) item embeddings it was fitted on (None if none were
    computed), and the evaluation rows of the index as trained (method ``poeem-as-trained``,
    what the run would serve without the refit), measured before it was replaced."""
    if cfg.train.refit is None or model.index is None:
        return {}, None, []
    model.eval()  # the items as served
    with torch.no_grad():
        items = model.all_item_embeddings(artifacts.item_features)
    as_trained = learned_index_rows(
        model, data, items.cpu(), cfg.eval.ks, cfg.eval.nprobes, "poeem-as-trained"
    )
    started = time.perf_counter()
    print(f"refitting the index's coder ({cfg.train.refit}) on {items.shape[0]} items ...", flush=True)
    model.index = refit_layer(model.index, items, cfg.train.refit, progress=cfg.train.progress)
    return {"quantizer": cfg.train.refit, "seconds": time.perf_counter() - started}, items, as_trained


def _distill_after_training(
    model: RetrievalModel,
    data: InteractionData,
    artifacts: RunArtifacts,
    cfg: RunConfig,
    items: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Distil the trained model's layer in place (``train.distill_epochs``), on the eval-mode
    ``items`` (num_items, dim) if already computed; what it did, or {}."""
    epochs = distill_epochs(cfg)
    if not epochs or model.index is None:
        return {}
    from poeem.pipeline.distill import distill_run_index

    model.eval()
    started = time.perf_counter()
    print(f"distilling the index ({epochs} epochs per round) ...", flush=True)  # a line off a terminal too
    distill = run_distill_config(DistillConfig(epochs=epochs, seed=cfg.train.seed), cfg, data.num_items)
    _, result = distill_run_index(
        model, data, artifacts.item_features, distill, progress=cfg.train.progress, items=items
    )
    kept = {"best": result.best, "guard": result.guard, "kept_start": result.kept_start}
    return {"seconds": time.perf_counter() - started, "epochs": len(result.history), **kept}


def export_run(
    run_dir: str | Path,
    out: str | Path,
    fast_scan: bool | None = None,
    replace: bool = False,
    distill: DistillConfig | None = None,
    layer_settings: dict[str, Any] | None = None,
    resume: bool = False,
    from_training: FromTraining | None = EXPORT_DEFAULT,
    refit: Refit | None = None,
    as_trained: bool = False,
) -> Searcher | None:
    """Export a trained run's learned index, query tower, features and ids (no training).

    ``fast_scan``: a 4-bit fast-scan FAISS index; None (default) when the layer has PQ codes
    with K = 16 (:func:`poeem.export.faiss_codec.default_fast_scan`).

    ``as_trained``: a refitted run's index as training left it (see :func:`load_run`) instead
    of the refit it serves.

    ``from_training`` says what is reused from training for the items a step coded since the
    index was fitted (:mod:`poeem.export.item_codes`): ``"lists"`` (default) keeps each item's
    list and encodes its residual, skipping the list search; ``"codes"`` keeps its codes (no
    pass over the catalogue; codes up to an epoch old); None encodes every item from scratch.

    With ``distill``, the index is first distilled from the model's own ranking of its
    training queries (:func:`poeem.pipeline.distill.distill_run_index`; a run without a layer
    gets a new one with ``layer_settings``); the run itself is not changed. Its state is kept
    after every epoch next to ``out`` and, with ``resume``, continued (see
    :func:`poeem.pipeline.distill.checkpoint_for`). With ``refit`` too, the distilled index is
    a refit of the run's layer (:func:`poeem.index.refit.refit_layer`).

    Items are encoded with their saved features, exactly as the model embeds them; FAISS
    stores the data's own item ids when they are non-negative integers (else row numbers,
    mapped back by the index directory). Under ``torchrun`` each rank embeds and encodes its
    contiguous share of the items and rank 0 writes the one index from the gathered codes,
    byte-identical to a single-process export.

    Returns:
        The new index's :class:`Searcher` on rank 0; None on the other ranks.
    """
    run_dir = Path(run_dir)
    check_from_training(from_training)
    if as_trained and refit is not None:
        raise PoeemError("export", "the index as trained or a refit", "both asked", "drop one of them")
    distributed.setup(torch.device("cpu"))
    cfg, model = load_run(run_dir, as_trained=as_trained)
    if model.index is None and distill is None:
        raise PoeemError(
            "export",
            "a run trained with a Poeem layer",
            f"'{run_dir}' (baseline, no layer)",
            "train with --poeem, or distil an index for it with 'poeem distill'",
        )
    art = read_artifacts(run_dir)
    text_query = text_item = None
    data = load_data(cfg.data) if distill is not None or isinstance(model, TextTwoTowerModel) else None
    if isinstance(model, TextTwoTowerModel):
        assert data is not None
        attach_data(model, data, distributed.is_main())
        text_query, text_item = model.query_side(), model.item_side()
    checkpoint = None
    if distill is not None:
        from poeem.pipeline.distill import checkpoint_for, distill_run_index

        assert data is not None
        checkpoint = checkpoint_for(out, resume, replace)
        distill = run_distill_config(distill, cfg, data.num_items)
        layer, result = distill_run_index(
            model,
            data,
            art.item_features,
            distill,
            layer_settings,
            cfg.train.progress,
            checkpoint,
            resume,
            refit,
        )
        coarse_codes, codes = result.coarse_codes, result.codes
    else:
        assert model.index is not None
        layer = model.index
        if from_training == "codes" and (layer.trained is None or not bool(layer.trained.seen().any())):
            warnings.warn(
                f"'{run_dir}' holds no codes from training (trained before poeem kept them, or "
                "with num_items 0): every item is encoded",
                stacklevel=2,
            )
        coarse_codes, codes = item_codes(
            model, art.item_features, progress=cfg.train.progress, from_training=from_training
        )
    if not distributed.is_main():
        return None
    ids = None
    if art.item_keys is not None:
        keys = art.item_keys.keys
        ids = keys if art.item_keys.is_integer and keys.min(initial=0) >= 0 else keys.astype(str)
    searcher = Searcher.create(
        out,
        layer,
        (coarse_codes, codes),
        ids,
        metric=model.config.search_metric,
        fast_scan=fast_scan,
        query_tower=getattr(model, "query_tower", None),
        normalize_queries=cfg.model.score == "cosine",
        query_keys=art.query_keys,
        query_features=art.query_features,
        text_query=text_query,
        text_item=text_item,
        replace=replace,
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the index is written: nothing to resume
    return searcher
