"""Index distillation as a pipeline stage: for a trained run (``poeem distill RUN_DIR``) and for
any embeddings (``poeem distill --items --queries``). See :mod:`poeem.training.distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from poeem import distributed
from poeem.data import InteractionData
from poeem.errors import PoeemError
from poeem.evaluation.report import query_encoder
from poeem.ids import check_raw_ids
from poeem.index import PoeemLayer
from poeem.index.refit import Refit, refit_layer
from poeem.metric import prepare_queries
from poeem.model import RetrievalModel
from poeem.search.index_dir import check_publishable
from poeem.search.searcher import Searcher
from poeem.training.distill import DistillConfig, DistillResult, distill_index

FITTED_CODEBOOK_SIZE = 256  # K of an index fitted on embeddings trained without it


def new_layer(dim: int, settings: dict[str, Any], items: torch.Tensor, progress: bool) -> PoeemLayer:
    """A layer with ``settings`` (PoeemConfig fields), fitted on ``items`` (n, dim) by k-means.

    K defaults to 256 here, not to the layer's 16: 4-bit codes are the fastest index at equal
    bytes when trained jointly with the model, but fitted after training they lost recall to
    8-bit ones at equal bytes (``poeem distill --items`` on Gowalla and MovieLens 100K,
    docs/benchmarks.md; FAISS's own 4-bit fast scan loses more)."""
    k = settings.get("codebook_size", FITTED_CODEBOOK_SIZE)
    defaults = {"warmup_steps": 0, "codebook_size": k, "buffer_size": max(8192, k)}
    layer = PoeemLayer(dim=dim, **{**defaults, **settings})
    layer.initialize(items, progress=progress)
    return layer


def checkpoint_for(out: str | Path, resume: bool, replace: bool) -> Path:
    """Where a distillation that writes the index ``out`` keeps its state after every epoch
    (``<out>.distill.safetensors``, deleted once the index is written), checked against ``resume``;
    an ``out`` that holds an index without ``replace`` is refused now, before minutes of work."""
    check_publishable(out, replace)
    path = Path(out).with_name(Path(out).name + ".distill.safetensors")
    if resume and not path.is_file():
        raise PoeemError("--resume", f"a stopped distillation's state at '{path}'", "none", "drop --resume")
    if not resume and path.is_file():
        raise PoeemError(
            "distill",
            f"no stopped distillation for '{out}'",
            f"its state at '{path}'",
            "pass --resume to continue it, or delete the file to start over",
        )
    return path


def distill_run_index(
    model: RetrievalModel,
    data: InteractionData,
    item_features: torch.Tensor | None,
    config: DistillConfig,
    layer_settings: dict[str, Any] | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    refit: Refit | None = None,
    items: torch.Tensor | None = None,
) -> tuple[PoeemLayer, DistillResult]:
    """Distill a run's index from its own model's ranking of its training queries.

    Args:
        model: the trained model; its layer is distilled in place (nothing is written to the
            run), or for a run without a layer, a new one with ``layer_settings`` is fitted first.
        data: the run's data (its training queries are the teacher's queries).
        item_features: (num_items, Fi) the run's item features, or None.
        checkpoint, resume: see :func:`poeem.training.distill.distill_index`.
        refit: "rq" or "pq": distil a refit of the model's layer instead (its trained lists, a
            residual coder fitted on the final items: :func:`poeem.index.refit.refit_layer`);
            the lists stay as trained (:meth:`DistillConfig.keeping_lists`).
        items: (num_items, dim) the model's item embeddings, if they were just computed (in
            eval mode); None embeds them.

    Returns:
        The distilled layer and its item codes.
    """
    if distributed.is_active():
        raise PoeemError("distill", "one process", "torchrun", "run 'poeem distill' without torchrun")
    with torch.no_grad():
        items = model.all_item_embeddings(item_features) if items is None else items
        queries = query_encoder(model, data)(np.unique(data.train_queries))
    if model.index is not None:
        if layer_settings:
            raise PoeemError(
                "distill", "no layer flags for a run with a Poeem layer", sorted(layer_settings), "drop them"
            )
        layer = model.index
        if refit is not None:  # the refit keeps the trained lists: only its coder is distilled
            layer = refit_layer(layer, items, refit, progress)
            config = config.keeping_lists()
    elif refit is not None:
        raise PoeemError(
            "--refit",
            "a run trained with a Poeem layer (its lists are kept)",
            "a run without one",
            "drop --refit and pass layer flags (e.g. --quantizer rq) to fit a new index",
        )
    elif not layer_settings:
        raise PoeemError(
            "distill",
            "layer flags (e.g. --num-subspaces 8) for a run trained without a Poeem layer",
            "none",
            "pass --num-coarse, --num-subspaces, --codebook-size and --rotation",
        )
    else:
        layer = new_layer(model.config.dim, layer_settings, items, progress)
    return layer, distill_index(layer, items, queries, config, progress, checkpoint, resume)


def layer_from_faiss(source: str | Path | Any, dim: int, rotation: str | None) -> tuple[PoeemLayer, str]:
    """A layer holding a FAISS IVF-PQ or IVF-RQ index's quantizer, and the index's metric.

    Args:
        source: a FAISS index file, or a ``faiss.Index`` (see
            :func:`poeem.export.faiss_codec.faiss_quantizer`).
        dim: the dimension of the item embeddings.
        rotation: None (the file's: "opq" or "none") or "givens" (learnable, on top of it).
    """
    from poeem.export.faiss_codec import faiss_quantizer, read_faiss_quantizer

    found = read_faiss_quantizer(source) if isinstance(source, str | Path) else faiss_quantizer(source)
    if found.dim != dim:
        raise PoeemError(
            "--from-faiss", f"an index of the items' dim {dim}", f"dim {found.dim}", "match them"
        )
    if found.metric == "l2":
        raise PoeemError(
            "--from-faiss",
            "an inner-product or cosine index (the teacher ranks by inner product)",
            "an L2 index",
            "distil a METRIC_INNER_PRODUCT index",
        )
    if rotation not in (None, "givens"):
        raise PoeemError("--rotation with --from-faiss", "givens (or none given)", repr(rotation), "drop it")
    settings = {**found.settings, **({"rotation": "givens"} if rotation else {})}
    buffer = max(settings["codebook_size"], settings["num_coarse"])  # nothing is collected
    layer = PoeemLayer(dim=dim, warmup_steps=0, buffer_size=buffer, **settings)
    layer.initialize_from(found.rotation, found.coarse, found.codebooks)
    return layer, found.metric


def distill_embeddings(
    items: np.ndarray,
    queries: np.ndarray,
    out: str | Path,
    layer_settings: dict[str, Any],
    metric: str = "ip",
    ids: Any = None,
    config: DistillConfig | None = None,
    fast_scan: bool | None = None,
    replace: bool = False,
    progress: bool = True,
    from_faiss: str | Path | None = None,
    resume: bool = False,
) -> tuple[Searcher, DistillResult]:
    """Fit (or read) and distill an index for any embeddings, and write it as an index directory.

    Args:
        items: (n, dim) item embeddings.
        queries: (nq, dim) query embeddings of the kind the index will serve (logged or
            generated queries; no labels).
        out: the index directory to write (``Searcher.load`` and ``poeem serve`` open it).
        layer_settings: PoeemConfig fields (num_coarse, num_subspaces, codebook_size, rotation ...).
        metric: "ip" or "cosine" (vectors are normalised for cosine).
        ids: (n,) the items' own ids (integers or strings); row numbers by default.
        fast_scan: a 4-bit fast-scan FAISS index; None: when the codes are PQ with K = 16.
        from_faiss: start from this FAISS IVF-PQ (or IVF-RQ) file's quantizer instead of fitting one; its
            metric replaces ``metric``, and ``layer_settings`` may only ask for a "givens" rotation.
        resume: continue a stopped distillation for ``out`` (see :func:`checkpoint_for`).

    Returns:
        The new index's searcher and the distillation's codes and history.
    """
    if metric not in ("ip", "cosine"):
        raise PoeemError(
            "--metric", "'ip' or 'cosine' (the teacher ranks by inner product)", repr(metric), "pick one"
        )
    checkpoint = checkpoint_for(out, resume, replace)
    x = prepare_queries(items, "ip", None, "items")  # shape and finiteness, before any work
    dim = x.shape[1]
    if ids is not None:  # before the distillation, which would otherwise run for nothing
        check_raw_ids(ids, x.shape[0], "--ids")
    layer = None
    if from_faiss is not None:
        if set(layer_settings) - {"rotation"}:
            raise PoeemError(
                "--from-faiss", "no layer flags but --rotation givens", sorted(layer_settings), "drop them"
            )
        layer, metric = layer_from_faiss(from_faiss, dim, layer_settings.get("rotation"))
    x = prepare_queries(x, metric, dim, "items")  # normalised for cosine
    q = prepare_queries(queries, metric, x.shape[1], "queries")
    layer = layer or new_layer(x.shape[1], layer_settings, x, progress)
    result = distill_index(layer, x, q, config, progress, checkpoint, resume)
    searcher = Searcher.create(
        out,
        layer,
        (result.coarse_codes, result.codes),
        ids,
        metric=metric,
        fast_scan=fast_scan,
        replace=replace,
    )
    checkpoint.unlink(missing_ok=True)  # the index is written: nothing to resume
    return searcher, result
