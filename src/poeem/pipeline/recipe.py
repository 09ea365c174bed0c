"""One path builds the index a run or a set of embeddings serves.

A recipe (:class:`IndexRecipe`) says where the index starts and whether it is distilled:

- ``"trained"``: the run's layer as the run serves it (its refit, for a run refitted after
  training); ``"as-trained"``: a refitted run's layer as training left it;
- ``"refit"``: the run's trained lists, with a residual coder fitted on the final items
  (:func:`poeem.index.refit.refit_layer`);
- ``"fit"``: a new layer with the recipe's layer settings, fitted by k-means on the items;
- ``"faiss"``: the quantizer of a FAISS IVF-PQ or IVF-RQ file.

:func:`build_index` applies a recipe to a source, a trained run (:class:`RunSource`) or any
embeddings (:class:`EmbeddingSource`). ``poeem train`` applies the run's recipe after training
(:meth:`IndexRecipe.of_run`), and ``poeem export`` and ``poeem distill`` apply theirs before
writing (:func:`poeem.pipeline.run.export_run`, :func:`poeem.pipeline.distill.distill_embeddings`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from poeem import distributed
from poeem.data import InteractionData
from poeem.errors import PoeemError
from poeem.export.item_codes import EXPORT_DEFAULT, FromTraining, check_from_training, item_codes
from poeem.export.item_vectors import Precision, check_precision
from poeem.export.learned import ItemsOrCodes
from poeem.index import PoeemLayer
from poeem.index.config import FITTED_CODEBOOK_SIZE, LEARNED_ROTATIONS
from poeem.index.refit import Refit, check_refit, refit_layer
from poeem.metric import Metric, check_item_norms, prepare_queries
from poeem.model import RetrievalModel
from poeem.model.query_encoder import QueryEncoder
from poeem.pipeline.config import RunConfig
from poeem.training.distill import DistillConfig, distill_index

Start = Literal["trained", "as-trained", "refit", "fit", "faiss"]
# per round, when a run that refits its layer or fits it after training (schedule after_training)
# leaves train.distill_epochs unset; poeem distill's own default too
DEFAULT_DISTILL_EPOCHS = 10


@dataclass(frozen=True)
class IndexRecipe:
    """How the served index is built: where it starts, and whether it is distilled.

    Args:
        start: see the module docstring.
        refit: with start "refit": the residual coder, "rq" or "pq".
        layer: with start "fit": PoeemConfig fields of the new layer (num_coarse,
            num_subspaces, codebook_size, rotation, quantizer); with "faiss": only
            ``{"rotation": "givens"}`` or ``"cayley"``, a learnable rotation on top of the file's.
        faiss_file: with start "faiss": the FAISS index file.
        distill: distil the index from the model's own ranking (None: no distillation).
        from_training: with start "trained" or "as-trained" and no distillation, what each item
            reuses from training (:mod:`poeem.export.item_codes`).
        rerank: also keep each item's final embedding at this precision ("float", "fp16" or
            "sq8", :mod:`poeem.export.item_vectors`) to re-rank search candidates; None: codes only.
    """

    start: Start = "trained"
    refit: Refit | None = None
    layer: dict[str, Any] = field(default_factory=dict)
    faiss_file: str | Path | None = None
    distill: DistillConfig | None = None
    from_training: FromTraining | None = EXPORT_DEFAULT
    rerank: Precision | None = None

    def __post_init__(self) -> None:
        if self.start not in get_args(Start):
            raise PoeemError("recipe start", f"one of {get_args(Start)}", repr(self.start), "pick one")
        if self.rerank is not None:
            check_precision(self.rerank)
        check_from_training(self.from_training)
        if (self.refit is not None) != (self.start == "refit"):
            raise PoeemError(
                "recipe",
                "the index as trained or a refit (refit= exactly with start 'refit')",
                f"start {self.start!r}, refit {self.refit!r}",
                "drop one of them",
            )
        if self.refit is not None:
            check_refit(self.refit)
        if (self.faiss_file is not None) != (self.start == "faiss"):
            raise PoeemError(
                "recipe", "faiss_file exactly with start 'faiss'", f"start {self.start!r}", "match them"
            )
        if self.start == "faiss" and set(self.layer) - {"rotation"}:
            raise PoeemError(
                "--from-faiss",
                "no layer flags but --rotation givens or cayley",
                sorted(self.layer),
                "drop them",
            )
        if self.layer and self.start not in ("fit", "faiss"):
            raise PoeemError(
                "recipe",
                "layer settings only with start 'fit' (a new index)",
                f"start {self.start!r}",
                "drop them",
            )

    @classmethod
    def of_run(cls, cfg: RunConfig, layer: PoeemLayer | None = None) -> IndexRecipe:
        """What a run applies to its ``layer`` after training: its ``train.refit`` and its
        :func:`distill_epochs`; for a layer of the "after_training" schedule, a fit of its
        settings on every item, then the distillation."""
        epochs = distill_epochs(cfg)
        distill = DistillConfig(epochs=epochs, seed=cfg.train.seed) if epochs else None
        if layer is not None and layer.config.schedule == "after_training":
            settings = {**layer.config.to_dict(), "warmup_steps": 0, "schedule": "joint"}
            del settings["dim"]
            return cls(start="fit", layer=settings, distill=distill)
        return cls(start="refit" if cfg.train.refit else "trained", refit=cfg.train.refit, distill=distill)

    @property
    def needs_items(self) -> bool:
        """Whether the recipe needs every item's embedding at once (one process)."""
        return self.start in ("refit", "fit", "faiss") or self.distill is not None or self.rerank is not None


def distill_epochs(cfg: RunConfig) -> int:
    """Epochs per round of index distillation after training: ``train.distill_epochs``, or when
    it is None, :data:`DEFAULT_DISTILL_EPOCHS` for a refitted layer (``train.refit``), which
    gains most from it, and for one fitted after training (text towers by default), and 0
    otherwise: a jointly trained run serves its index as trained, ready when training ends, in
    one process and under torchrun alike (docs/design.md, "Codebook size")."""
    if cfg.train.distill_epochs is not None:
        return cfg.train.distill_epochs
    if cfg.model.poeem is not None and (cfg.train.refit or cfg.model.index_schedule == "after_training"):
        return DEFAULT_DISTILL_EPOCHS
    return 0


def run_distill_config(config: DistillConfig, cfg: RunConfig, num_items: int) -> DistillConfig:
    """``config`` for a run: unless set, its guard watches the shallowest depth the run
    evaluates (``eval.ks``), and a catalogue smaller than the teacher's top-k is ranked whole; a
    run refitted after training (``train.refit``) keeps its trained lists
    (:meth:`DistillConfig.keeping_lists`)."""
    guard_k = config.guard_k or min(min(cfg.eval.ks), num_items)
    config = replace(config, guard_k=guard_k, teacher_k=min(config.teacher_k, num_items))
    return config.keeping_lists() if cfg.train.refit else config


@dataclass
class RunSource:
    """A trained run as the source of an index.

    Args:
        model: the trained model (its layer, if any, is the index a "trained" recipe starts from).
        item_features: (num_items, Fi) the run's item features, or None.
        cfg: the run's config.
        data: the run's data; its training queries teach a distillation (needed only then).
    """

    model: RetrievalModel
    item_features: torch.Tensor | None
    cfg: RunConfig
    data: InteractionData | None = None
    _items: torch.Tensor | None = field(default=None, init=False, repr=False)

    @property
    def metric(self) -> Metric:
        """The metric the index searches by."""
        return self.model.config.search_metric  # type: ignore[return-value]

    @property
    def layer(self) -> PoeemLayer | None:
        """The model's layer (None for a run trained without one)."""
        return self.model.index

    def item_embeddings(self) -> torch.Tensor:
        """(num_items, dim) the model's item embeddings in eval mode, computed once."""
        if self._items is None:
            self.model.eval()
            with torch.no_grad():
                self._items = self.model.all_item_embeddings(self.item_features)
        return self._items

    def query_embeddings(self) -> torch.Tensor:
        """(nq, dim) embeddings of the run's distinct training queries."""
        assert self.data is not None, "a distillation needs the run's data"
        return QueryEncoder.from_model(self.model, self.data).by_rows(np.unique(self.data.train_queries))

    def distill_config(self, config: DistillConfig) -> DistillConfig:
        """``config`` adjusted to the run (:func:`run_distill_config`)."""
        num_items = self.data.num_items if self.data is not None else self.item_embeddings().shape[0]
        return run_distill_config(config, self.cfg, num_items)


@dataclass
class EmbeddingSource:
    """Any embeddings as the source of an index.

    Args:
        items: (n, dim) item embeddings.
        queries: (nq, dim) query embeddings of the kind the index will serve (no labels).
        metric: "ip" or "cosine" (vectors are normalised for cosine); a FAISS file's replaces it.
    """

    items: Any
    queries: Any
    metric: Metric = "ip"

    def __post_init__(self) -> None:
        if self.metric not in ("ip", "cosine"):
            raise PoeemError(
                "--metric",
                "'ip' or 'cosine' (the teacher ranks by inner product)",
                repr(self.metric),
                "pick one",
            )
        x = prepare_queries(self.items, self.metric, None, "items")  # shape and finiteness, before any work
        check_item_norms(x)
        self.num_items, self.dim = x.shape
        self._prepared = (self.metric, x)  # the items as prepared for a metric, kept for reuse
        prepare_queries(self.queries, "ip", self.dim, "queries")

    @property
    def layer(self) -> PoeemLayer | None:
        """None: no layer is trained here; a recipe fits one or reads a FAISS file's."""
        return None

    def item_embeddings(self) -> torch.Tensor:
        """(n, dim) the items as the index codes them (normalised for cosine), prepared once per
        metric."""
        if self._prepared[0] != self.metric:
            self._prepared = (self.metric, prepare_queries(self.items, self.metric, self.dim, "items"))
        return self._prepared[1]

    def query_embeddings(self) -> torch.Tensor:
        """(nq, dim) the queries, normalised for cosine."""
        return prepare_queries(self.queries, self.metric, self.dim, "queries")

    def distill_config(self, config: DistillConfig) -> DistillConfig:
        """``config`` as given."""
        return config


Source = RunSource | EmbeddingSource


@dataclass
class BuiltIndex:
    """What :func:`build_index` made.

    Args:
        layer: the index's layer.
        items: (n, dim) item embeddings or (coarse_codes, codes) to write with it; None when
            not asked for.
        metric: the metric the index searches by.
        stages: per stage ("refit", "distill"), what it did and its seconds.
        vectors: with the recipe's ``rerank``: (n, dim) the item embeddings to keep.
    """

    layer: PoeemLayer
    items: ItemsOrCodes | None
    metric: Metric
    stages: dict[str, dict[str, Any]]
    vectors: torch.Tensor | None = None


def build_index(
    source: Source,
    recipe: IndexRecipe,
    progress: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    encode: bool = True,
) -> BuiltIndex:
    """Apply ``recipe`` to ``source``: start the index, distil it if asked, and code the items.

    Args:
        source: a trained run or any embeddings.
        recipe: where the index starts and whether it is distilled.
        checkpoint, resume: the distillation's state file (see
            :func:`poeem.training.distill.distill_index`).
        encode: also code the items (what an export writes); False for a run that only keeps
            the layer.

    With start "trained" the run's own layer is changed in place by a distillation. Under
    torchrun only the recipes that need no item embeddings at once run (an export as trained).
    """
    if recipe.needs_items and distributed.is_active():
        raise PoeemError(
            "the index's recipe",
            "one process for a refit, a fit, a distillation or stored vectors (--rerank)",
            "torchrun",
            "run 'poeem distill' or 'poeem export --rerank' without torchrun",
        )
    stages: dict[str, dict[str, Any]] = {}
    layer = _start(source, recipe, progress, stages)
    items: ItemsOrCodes | None = None
    if recipe.distill is not None:
        config = source.distill_config(recipe.distill)
        config = config.keeping_lists() if recipe.start == "refit" else config
        started = time.perf_counter()
        if progress:
            print(f"distilling the index ({config.epochs} epochs per round) ...", flush=True)
        result = distill_index(
            layer, source.item_embeddings(), source.query_embeddings(), config, progress, checkpoint, resume
        )
        kept = {"best": result.best, "guard": result.guard, "kept_start": result.kept_start}
        stages["distill"] = {"seconds": time.perf_counter() - started, "epochs": len(result.history), **kept}
        items = (result.coarse_codes, result.codes)
    elif encode and isinstance(source, RunSource) and recipe.start in ("trained", "as-trained"):
        items = item_codes(
            source.model, source.item_features, progress=progress, from_training=recipe.from_training
        )
    elif encode:
        items = source.item_embeddings()
    vectors = source.item_embeddings() if encode and recipe.rerank is not None else None
    return BuiltIndex(layer, items, source.metric, stages, vectors)


def _start(
    source: Source, recipe: IndexRecipe, progress: bool, stages: dict[str, dict[str, Any]]
) -> PoeemLayer:
    """The layer the recipe starts from; a refit's seconds go to ``stages``."""
    trained = source.layer
    if recipe.start in ("trained", "as-trained"):
        if trained is None:
            raise PoeemError(
                "the index",
                "a run trained with a Poeem layer, or layer flags (e.g. --num-subspaces 8) for a run "
                "trained without one",
                "a run without a layer, and no layer flags",
                "train with --poeem, or fit one: 'poeem distill RUN_DIR --num-subspaces 8 ...'",
            )
        return trained
    if recipe.start == "refit":
        if trained is None:
            raise PoeemError(
                "--refit",
                "a run trained with a Poeem layer (its lists are kept)",
                "a run without one",
                "drop --refit and pass layer flags (e.g. --quantizer rq) to fit a new index",
            )
        assert recipe.refit is not None
        started = time.perf_counter()  # embedding the items is part of the stage
        items = source.item_embeddings()
        if progress:
            print(f"refitting the index's coder ({recipe.refit}) on {items.shape[0]} items ...", flush=True)
        layer = refit_layer(trained, items, recipe.refit, progress=progress)
        stages["refit"] = {"quantizer": recipe.refit, "seconds": time.perf_counter() - started}
        return layer
    if recipe.start == "faiss":
        if not isinstance(source, EmbeddingSource):
            raise PoeemError("--from-faiss", "--items and --queries", "a run", "pass --items and --queries")
        assert recipe.faiss_file is not None
        layer, metric = layer_from_faiss(recipe.faiss_file, source.dim, recipe.layer.get("rotation"))
        source.metric = metric  # type: ignore[assignment]
        return layer
    if trained is not None and trained.is_initialized:  # a layer of the "after_training" schedule is not
        raise PoeemError(
            "distill", "no layer flags for a run with a Poeem layer", sorted(recipe.layer), "drop them"
        )
    started = time.perf_counter()
    items = source.item_embeddings()
    if progress:
        print(f"fitting the index on {items.shape[0]} items ...", flush=True)
    layer = new_layer(items.shape[1], recipe.layer, items, progress)
    stages["fit"] = {"items": int(items.shape[0]), "seconds": time.perf_counter() - started}
    return layer


def new_layer(dim: int, settings: dict[str, Any], items: torch.Tensor, progress: bool) -> PoeemLayer:
    """A layer with ``settings`` (PoeemConfig fields), fitted on ``items`` (n, dim) by k-means.

    K defaults to 256 here, not to the layer's 16: 4-bit codes are the fastest index at equal
    bytes when trained jointly with the model, but fitted after training they lost recall to
    8-bit ones at equal bytes (docs/design.md, "Codebook size")."""
    k = settings.get("codebook_size", FITTED_CODEBOOK_SIZE)
    defaults = {"warmup_steps": 0, "codebook_size": k, "buffer_size": max(8192, k)}
    layer = PoeemLayer(dim=dim, **{**defaults, **settings})
    layer.initialize(items, progress=progress)
    return layer


def layer_from_faiss(source: str | Path | Any, dim: int, rotation: str | None) -> tuple[PoeemLayer, Metric]:
    """A layer holding a FAISS IVF-PQ or IVF-RQ index's quantizer, and the index's metric.

    Args:
        source: a FAISS index file, or a ``faiss.Index`` (see
            :func:`poeem.export.faiss_codec.faiss_quantizer`).
        dim: the dimension of the item embeddings.
        rotation: None (the file's: "opq" or "none"), or "givens" or "cayley" (learnable, on
            top of it).
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
    if rotation not in (None, *LEARNED_ROTATIONS):
        raise PoeemError(
            "--rotation with --from-faiss", "givens or cayley (or none given)", repr(rotation), "drop it"
        )
    settings = {**found.settings, **({"rotation": rotation} if rotation else {})}
    buffer = max(settings["codebook_size"], settings["num_coarse"])  # nothing is collected
    layer = PoeemLayer(dim=dim, warmup_steps=0, buffer_size=buffer, **settings)
    layer.initialize_from(found.rotation, found.coarse, found.codebooks)
    return layer, found.metric  # type: ignore[return-value]
