"""A run end to end: data, model and trainer wired into a run folder; evaluation; export."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from poeem import distributed
from poeem.data import InteractionData, load_data
from poeem.errors import PoeemError
from poeem.evaluation.report import compare_indexes, learned_index_rows
from poeem.folder_lock import folder_writer, writer_of
from poeem.index.config import FITTED_CODEBOOK_SIZE, PoeemConfig
from poeem.model import RetrievalModel
from poeem.model.config import TextConfig
from poeem.model.text import TextTwoTowerModel
from poeem.pipeline.config import RunConfig, run_options
from poeem.pipeline.distill import checkpoint_for
from poeem.pipeline.recipe import IndexRecipe, RunSource, build_index
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
from poeem.training.table_sharding import (
    RUN_TABLES,
    check_table_sharding,
    run_tables,
    save_with_tables,
    shard_id_tables,
    sharded_tables,
    tables_metadata,
    unshard_id_tables,
    whole_tables,
)
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


def evaluate_model(model: RetrievalModel, data: InteractionData, cfg: RunConfig) -> list[dict[str, Any]]:
    """The evaluation rows a run's config asks for (see :func:`compare_indexes`)."""
    return compare_indexes(
        model,
        data,
        cfg.eval.ks,
        cfg.eval.nprobes,
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
        run_dir: the run folder; it must not hold a trained run unless ``resume``. The run holds
            its writer lock throughout (:mod:`poeem.folder_lock`): a folder another process
            writes is refused before anything is written.
        resume: continue from the folder's checkpoint, exactly where it stopped.

    Under ``torchrun`` every rank trains its share of each batch (see
    :class:`~poeem.training.batches.PairBatches`); rank 0 writes the folder and evaluates.

    Returns:
        The trained model and the metrics written to ``metrics.json`` (empty on ranks other
        than 0); ``train_s`` is the training time without the periodic evaluations.
    """
    run_dir = Path(run_dir)
    cfg = _with_absolute_paths(cfg)
    device = distributed.setup(resolve_device(cfg.train.device))
    with folder_writer(run_dir, "poeem train" + " --resume" * resume):  # one writer: every rank agrees
        return _train_run(cfg, run_dir, resume, device)


def _train_run(
    cfg: RunConfig, run_dir: Path, resume: bool, device: torch.device
) -> tuple[RetrievalModel, dict[str, Any]]:
    """:func:`train_run` once this process group holds the run folder's writer lock."""
    if not resume and (
        (run_dir / "model.safetensors").exists() or (run_dir / "checkpoint.safetensors").exists()
    ):
        raise PoeemError(
            "run folder",
            "a new or empty folder",
            f"'{run_dir}' holds a trained run",
            "pass --resume to continue it, or another --run-dir (nothing was overwritten)",
        )
    cfg = resolve_refit(cfg)
    _check_distill(cfg)
    sharded_ids = cfg.train.table_sharding == "torchrec" and cfg.model.text is None
    if sharded_ids and cfg.model.poeem is not None and cfg.model.index_schedule == "after_training":
        raise PoeemError(  # rank 0 alone cannot read the other ranks' rows
            "--index-schedule",
            "joint with sharded tables (the index trains with the model)",
            "after_training",
            "drop --index-schedule, or distil the finished run: 'poeem distill RUN_DIR ...'",
        )
    data = load_data(cfg.data)
    shapes = model_shapes(data)
    check_table_sharding(cfg.train, cfg.model.text is None, cfg.model.table_dtype, device)
    sharded = cfg.train.table_sharding == "torchrec"
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, shapes, torch.from_numpy(data.item_popularity()), tables_on_meta=sharded)
    if sharded:  # each rank draws and holds its own rows only
        shard_id_tables(model, cfg.train)
        if distributed.is_main():
            print("the id tables are sharded over the ranks: no evaluation during training", flush=True)
    model = model.to(device)
    if model.index is not None:
        check_catalogue(model.index.config, data.num_items, data.name)
    attach_data(model, data, cfg.train.progress and distributed.is_main())
    artifacts = RunArtifacts.of(data)
    model.warm_start_on_catalogue(artifacts.item_features)
    if distributed.is_main():
        save_run(run_dir, cfg, shapes, artifacts)
    # a sharded table answers lookups from every rank at once: no evaluation on rank 0 alone
    trainer = Trainer(model, cfg.train, run_dir, None if sharded else _periodic_eval(model, data, cfg))
    batches = PairBatches(data, cfg.train.batch_size, cfg.train.seed, device, cfg.model.random_negatives)
    if resume:
        trainer.resume()
    if distributed.is_main():
        kind = "two-tower model with a Poeem layer" if cfg.model.poeem is not None else "two-tower model"
        span = f"{cfg.train.epochs} epochs" if cfg.train.max_steps is None else "--max-steps"
        steps = f"{trainer.total_steps(len(batches))} steps of batch {cfg.train.batch_size} ({span})"
        print(f"training a {kind} on {data.summary()}; {steps} into {run_dir}/", flush=True)
    started = time.perf_counter()
    history = trainer.fit(batches)
    train_s = time.perf_counter() - started - trainer.eval_s
    if model.index is not None and not model.index.is_initialized and cfg.model.index_schedule == "joint":
        warnings.warn(
            "training ended inside the Poeem warm start, so the index was fitted on the final "
            "item embeddings instead of trained jointly; lower warmup_steps or train longer",
            stacklevel=2,
        )
        model.index.initialize(
            model.all_item_embeddings(artifacts.item_features), progress=cfg.train.progress
        )
    if sharded:  # every rank saves its own rows; rank 0 then holds whole tables to evaluate
        _save_sharded(run_dir, model, trainer.step, whole_on_rank0=cfg.eval.after_training)
    if not distributed.is_main():
        return model, {}
    trained_index = model.index
    # the trained model is saved before the stages after training, so that none loses it
    if cfg.train.refit is not None:  # until the refit is saved, the run serves its index as trained
        save_config(run_dir, replace(cfg, train=replace(cfg.train, refit=None)), shapes)
    if not sharded:
        save_weights(run_dir, model)
    stages, as_trained = _after_training(model, data, artifacts, cfg, run_dir)
    if stages:
        save_weights(run_dir, model, trained_index if "refit" in stages else None)  # both indexes of a refit
        save_config(run_dir, cfg, shapes)
    rows = (_final_evaluation(model, data, cfg) if cfg.eval.after_training else []) + as_trained
    metrics = {
        "data": data.summary(),
        "steps": trainer.step,
        "train_s": train_s,
        "eval_during_training_s": trainer.eval_s,
        "rows": rows,
        "history": history,
        "index_stats": model.index.stats() if model.index is not None else {},
    }
    metrics.update(stages)
    write_metrics(run_dir, metrics)
    return model, metrics


def _final_evaluation(model: RetrievalModel, data: InteractionData, cfg: RunConfig) -> list[dict[str, Any]]:
    """The evaluation rows of a finished run, announced by a line (also off a terminal)."""
    evaluated = ["exact search"] + ["the index the run serves"] * (model.index is not None)
    evaluated += ["FAISS IVF-PQ built on the item embeddings"] * cfg.eval.faiss_baseline
    print(f"evaluating {', '.join(evaluated)} ...", flush=True)
    return evaluate_model(model, data, cfg)


def _save_sharded(run_dir: Path, model: RetrievalModel, step: int, whole_on_rank0: bool) -> None:
    """Save a model with sharded tables (a collective call): each rank writes its rows, then rank
    0 the rest of the model, whose header names them (the commit point); with
    ``whole_on_rank0``, the model on rank 0 gets whole tables back, read from the folder, to
    evaluate (docs/distributed.md)."""
    towers = list(sharded_tables(model))

    def write(tag: str) -> None:
        save_weights(run_dir, model, metadata=tables_metadata(towers, tag))

    save_with_tables(model, run_dir / RUN_TABLES, step, write)
    if whole_on_rank0 and distributed.is_main():
        unshard_id_tables(model, whole_tables(run_tables(run_dir)))


def _periodic_eval(
    model: RetrievalModel, data: InteractionData, cfg: RunConfig
) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The trainer's evaluation during training: exact search and the index at the first nprobe,
    without the FAISS baseline, as "method/metric@k" values."""

    def evaluate(_: torch.nn.Module) -> dict[str, float]:
        rows = compare_indexes(model, data, cfg.eval.ks, cfg.eval.nprobes[:1], faiss_baseline=False)
        return {
            f"{r['method']}/{name}": v
            for r in rows
            for name, v in r.items()
            if name.split("@")[0] in ("recall", "precision", "ndcg")
        }

    return evaluate


def _with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its data file and text encoder folder made absolute, so that the run (and an
    index, which names the encoder too) finds them from anywhere."""
    if cfg.data.path and Path(cfg.data.path).exists():
        cfg = replace(cfg, data=replace(cfg.data, path=str(Path(cfg.data.path).resolve())))
    encoder = (cfg.model.text or {}).get("encoder")
    if encoder and Path(encoder).is_dir():
        text = {**(cfg.model.text or {}), "encoder": str(Path(encoder).resolve())}
        cfg = replace(cfg, model=replace(cfg.model, text=text))
    return cfg


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
    """Seconds a run spent on its index after training (a fit, a refit and the distillation,
    from ``train_run``'s metrics): part of the build time of the index it serves."""
    return sum(metrics.get(stage, {}).get("seconds", 0.0) for stage in ("fit", "refit", "distill"))


def resolve_refit(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``train.refit`` made concrete, as the run stores it. The default (None)
    stays None in one process and under torchrun alike; an explicit "auto" becomes "rq" for a
    run with a layer trained with the model in one process, else None (under torchrun it says
    how to refit afterwards)."""
    if cfg.train.refit != "auto":
        return cfg
    # a layer fitted after training has no trained index to refit: "auto" leaves it alone
    layer = cfg.model.poeem is not None and cfg.model.index_schedule != "after_training"
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
        after_training = cfg.model.index_schedule == "after_training"
        if after_training and flag == "--refit":
            raise PoeemError(
                "--refit",
                "a layer trained with the model (--index-schedule joint) to refit",
                "the after_training schedule, whose index is fitted after training already",
                "drop --refit (pick the fitted index with --quantizer), or add --index-schedule joint",
            )
        if distributed.is_active() and not after_training:  # rank 0 builds that index alone
            raise PoeemError(
                flag, "one process", "torchrun", f"train without it, then run {after} (one process)"
            )


def _fit_flags(layer: dict[str, Any]) -> str:
    """The ``poeem distill`` flags that fit the index a recipe's ``layer`` settings describe."""
    names = ("num_coarse", "num_subspaces", "codebook_size", "quantizer", "rotation")
    shown = {"codebook_size": FITTED_CODEBOOK_SIZE, **{k: layer[k] for k in names if k in layer}}
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shown.items())


def _after_training(
    model: RetrievalModel, data: InteractionData, artifacts: RunArtifacts, cfg: RunConfig, run_dir: Path
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Apply the run's index recipe (:meth:`IndexRecipe.of_run`) to the trained model's layer.
    Returns what each stage did ({} if nothing) and, for a refit, the evaluation rows of the
    index as trained (method ``poeem-as-trained``), measured before it was replaced."""
    recipe = IndexRecipe.of_run(cfg, model.index)
    if model.index is None or not recipe.needs_items:
        return {}, []
    source = RunSource(model, artifacts.item_features, cfg, data)
    as_trained = []
    try:
        if recipe.start == "refit":  # what the run would serve without the refit
            items = source.item_embeddings().cpu()
            ks, nprobes = cfg.eval.ks, cfg.eval.nprobes
            as_trained = learned_index_rows(model, data, items, ks, nprobes, "poeem-as-trained")
        with distributed.alone():  # rank 0, once the other ranks have finished
            built = build_index(source, recipe, progress=cfg.train.progress, encode=False)
    except (PoeemError, RuntimeError, ValueError) as err:
        if recipe.start == "fit":  # the towers trained alone: there is no index yet
            fix = (
                f"training finished and is saved in '{run_dir}': build its index with 'poeem distill "
                f"{run_dir} --out INDEX {_fit_flags(recipe.layer)}'"
            )
        else:
            finish = f"'poeem distill {run_dir} --out INDEX" + (
                f" --refit {cfg.train.refit}'" if cfg.train.refit else "'"
            )
            fix = (
                f"training finished and is saved in '{run_dir}' with its index as trained: export that "
                f"with 'poeem export {run_dir} --out INDEX', or finish with {finish}"
            )
        raise PoeemError(
            "the index after training",
            "a fit, refit or distillation that completes",
            f"{type(err).__name__}: {err}",
            fix,
        ) from err
    model.index = built.layer
    return built.stages, as_trained


def export_run(
    run_dir: str | Path,
    out: str | Path,
    fast_scan: bool | None = None,
    replace: bool = False,
    *,
    recipe: IndexRecipe | None = None,
    resume: bool = False,
) -> Searcher | None:
    """Build a trained run's index by ``recipe`` and write it, with the query tower, features and
    ids, as an index directory.

    Args:
        run_dir: a finished run folder.
        out: the index directory to write; the export holds its writer lock throughout
            (:mod:`poeem.folder_lock`), so two exports or distillations never write it at once.
        fast_scan: a 4-bit fast-scan FAISS index; None (default) when the layer has PQ codes
            with K = 16 (:func:`poeem.export.faiss_codec.default_fast_scan`).
        replace: ``out`` holds an index: publish this one as its next version.
        recipe: how the index is built (:class:`IndexRecipe`); by default the run's index as
            it serves it, with no training (the export). A distillation keeps its state next to
            ``out`` after every epoch and, with ``resume``, continues it
            (:func:`poeem.pipeline.distill.checkpoint_for`); the run itself is not changed.

    Items are encoded with their saved features, exactly as the model embeds them; FAISS
    stores the data's own item ids when they are non-negative integers (else row numbers,
    mapped back by the index directory). Under ``torchrun`` each rank embeds and encodes its
    contiguous share of the items and rank 0 writes the one index from the gathered codes,
    byte-identical to a single-process export.

    Returns:
        The new index's :class:`Searcher` on rank 0; None on the other ranks.
    """
    run_dir, recipe = Path(run_dir), recipe or IndexRecipe()
    distributed.setup(torch.device("cpu"))
    command = "poeem distill" if recipe.distill is not None else "poeem export"
    with folder_writer(out, command):  # one writer of the index directory (and its distillation state)
        return _export_run(run_dir, out, fast_scan, replace, recipe, resume)


def _export_run(
    run_dir: Path, out: str | Path, fast_scan: bool | None, replace: bool, recipe: IndexRecipe, resume: bool
) -> Searcher | None:
    """:func:`export_run` once this process group holds the index directory's writer lock."""
    training = writer_of(run_dir)
    if training is not None and distributed.is_main():
        warnings.warn(
            f"'{run_dir}' is being written by {training}: this reads the model it holds now", stacklevel=3
        )
    # under torchrun each rank of a run with sharded tables loads only its share of the items
    cfg, model = load_run(
        run_dir, as_trained=recipe.start == "as-trained", item_share=distributed.is_active()
    )
    if model.index is None and recipe.start in ("trained", "as-trained") and recipe.distill is None:
        raise PoeemError(
            "export",
            "a run trained with a Poeem layer",
            f"'{run_dir}' (baseline, no layer)",
            "train with --poeem, or fit and distil an index for it with 'poeem distill RUN_DIR "
            "--num-subspaces 8'",
        )
    art = read_artifacts(run_dir)
    text = isinstance(model, TextTwoTowerModel)
    data = load_data(cfg.data) if recipe.distill is not None or text else None
    if isinstance(model, TextTwoTowerModel):
        assert data is not None
        attach_data(model, data, distributed.is_main())
    if recipe.from_training == "codes" and not recipe.needs_items and model.index is not None:
        trained = model.index.trained
        if trained is None or not bool(trained.seen().any()):
            warnings.warn(
                f"'{run_dir}' holds no codes from training (trained before poeem kept them, or "
                "with num_items 0): every item is encoded",
                stacklevel=2,
            )
    checkpoint = checkpoint_for(out, resume, replace) if recipe.distill is not None else None
    source = RunSource(model, art.item_features, cfg, data)
    built = build_index(source, recipe, cfg.train.progress, checkpoint, resume)
    if not distributed.is_main():
        return None
    ids = None
    if art.item_keys is not None:
        keys = art.item_keys.keys
        ids = keys if art.item_keys.is_integer and keys.min(initial=0) >= 0 else keys.astype(str)
    text_sides = (
        (model.query_side(), model.item_side()) if isinstance(model, TextTwoTowerModel) else (None, None)
    )
    searcher = Searcher.create(
        out,
        built.layer,
        built.items,
        ids,
        metric=built.metric,
        fast_scan=fast_scan,
        query_tower=getattr(model, "query_tower", None),
        normalize_queries=cfg.model.score == "cosine",
        query_keys=art.query_keys,
        query_features=art.query_features,
        text_query=text_sides[0],
        text_item=text_sides[1],
        replace=replace,
        rerank=recipe.rerank,
        vectors=built.vectors,
    )
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the index is written: nothing to resume
    return searcher
