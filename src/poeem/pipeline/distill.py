"""Index distillation for any embeddings (``poeem distill --items --queries``), and the state a
stopped distillation leaves next to the index it writes. See :mod:`poeem.training.distill`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from poeem.errors import PoeemError
from poeem.export.index_dir import check_publishable
from poeem.export.item_vectors import Precision
from poeem.folder_lock import folder_writer
from poeem.ids import check_raw_ids
from poeem.metric import Metric
from poeem.pipeline.recipe import EmbeddingSource, IndexRecipe, build_index
from poeem.search.searcher import Searcher
from poeem.training.distill import DistillConfig


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


def distill_embeddings(
    items: np.ndarray,
    queries: np.ndarray,
    out: str | Path,
    layer_settings: dict[str, Any],
    metric: Metric = "ip",
    ids: Any = None,
    config: DistillConfig | None = None,
    fast_scan: bool | None = None,
    replace: bool = False,
    progress: bool = True,
    from_faiss: str | Path | None = None,
    resume: bool = False,
    rerank: Precision | None = None,
) -> tuple[Searcher, dict[str, Any]]:
    """Fit (or read) and distill an index for any embeddings, and write it as an index directory.

    Args:
        items: (n, dim) item embeddings.
        queries: (nq, dim) query embeddings of the kind the index will serve (logged or
            generated queries; no labels).
        out: the index directory to write (``Searcher.load`` and ``poeem serve`` open it); the
            distillation holds its writer lock throughout (:mod:`poeem.folder_lock`).
        layer_settings: PoeemConfig fields (num_coarse, num_subspaces, codebook_size, rotation ...).
        metric: "ip" or "cosine" (vectors are normalised for cosine).
        ids: (n,) the items' own ids (integers or strings); row numbers by default.
        fast_scan: a 4-bit fast-scan FAISS index; None: when the codes are PQ with K = 16.
        from_faiss: start from this FAISS IVF-PQ (or IVF-RQ) file's quantizer instead of fitting one; its
            metric replaces ``metric``, and ``layer_settings`` may only ask for a learned
            rotation ("givens" or "cayley").
        resume: continue a stopped distillation for ``out`` (see :func:`checkpoint_for`).
        rerank: also keep each item's vector at this precision ("float", "fp16", "sq8") to
            re-rank search candidates (:mod:`poeem.export.item_vectors`).

    Returns:
        The new index's searcher, and what the distillation did (seconds, epochs, the guard).
    """
    recipe = IndexRecipe(
        start="fit" if from_faiss is None else "faiss",
        layer=layer_settings,
        faiss_file=from_faiss,
        distill=config or DistillConfig(),
        rerank=rerank,
    )
    source = EmbeddingSource(items, queries, metric)
    with folder_writer(out, "poeem distill"):  # one writer of the index directory and its state
        checkpoint = checkpoint_for(out, resume, replace)
        if ids is not None:  # before the distillation, which would otherwise run for nothing
            check_raw_ids(ids, source.num_items, "--ids")
        built = build_index(source, recipe, progress, checkpoint, resume)
        searcher = Searcher.create(
            out,
            built.layer,
            built.items,
            ids,
            metric=built.metric,
            fast_scan=fast_scan,
            replace=replace,
            rerank=rerank,
            vectors=built.vectors,
        )
        checkpoint.unlink(missing_ok=True)  # the index is written: nothing to resume
    return searcher, built.stages["distill"]
