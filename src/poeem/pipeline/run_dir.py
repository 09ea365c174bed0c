"""The run folder: config, final weights, id maps, features and metrics of one training run.

::

    RUN_DIR/config.json              RunConfig plus the vocabulary sizes the model was built with
    RUN_DIR/model.safetensors        final weights (safetensors: loading executes no code)
    RUN_DIR/index_as_trained.safetensors   a refitted run's layer as training left it
    RUN_DIR/checkpoint.safetensors   model + optimizer + step, for --resume
    RUN_DIR/ids.json                 the data's own query and item ids of each dense row
    RUN_DIR/features.safetensors     per-id numeric features, when the data has feature columns
    RUN_DIR/metrics.json             evaluation results
    RUN_DIR/log.csv                  training curves
    RUN_DIR/writer.lock              the process training it (:mod:`poeem.folder_lock`)

Export and search read ids and features from here, so they use exactly the embeddings the
model computes and answer in the data's own ids. A name read from the folder (the tables a
sharded run saved) must resolve inside it (:func:`poeem.storage.inside`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from poeem import distributed
from poeem.data import InteractionData
from poeem.errors import PoeemError
from poeem.ids import IdMap
from poeem.index.refit import refit_settings
from poeem.model import ModelConfig, RetrievalModel, TwoTowerModel
from poeem.model.towers import TableRows
from poeem.pipeline.config import RunConfig
from poeem.storage import atomic_write_json, read_json, read_tensors, save_tensors
from poeem.training.table_sharding import check_saved_tables, run_tables, whole_tables
from poeem.user_files import require_folder

AS_TRAINED = "index_as_trained.safetensors"  # a refitted run's layer as training left it
FIX_RUN = "pass the folder 'poeem train' wrote, after training finished (or retrain)"


@dataclass
class RunArtifacts:
    """What a finished run folder holds besides the weights: ids and per-id features."""

    query_keys: IdMap | None = None
    item_keys: IdMap | None = None
    query_features: torch.Tensor | None = None  # (num_queries, Fq)
    item_features: torch.Tensor | None = None  # (num_items, Fi)

    @classmethod
    def of(cls, data: InteractionData) -> RunArtifacts:
        """The ids and features of ``data``."""

        def tensor(a: Any) -> torch.Tensor | None:
            return torch.from_numpy(a).float() if a is not None else None

        return cls(data.query_keys, data.item_keys, tensor(data.query_features), tensor(data.item_features))


def model_shapes(data: InteractionData) -> dict[str, int]:
    """The vocabulary and feature sizes a model for ``data`` is built with."""
    return {
        "num_queries": data.num_queries,
        "num_items": data.num_items,
        "num_query_features": 0 if data.query_features is None else data.query_features.shape[1],
        "num_item_features": 0 if data.item_features is None else data.item_features.shape[1],
    }


def build_model(
    cfg: ModelConfig,
    shapes: dict[str, int],
    item_counts: torch.Tensor | None = None,
    tables_on_meta: bool = False,
    replay_init: bool = True,
) -> RetrievalModel:
    """A fresh model for the given shapes: text towers when ``cfg.text`` is set (they still need
    :func:`poeem.pipeline.run.attach_data`), else id towers (with ``tables_on_meta``, their id
    tables take no memory until they are sharded: :class:`TwoTowerModel`)."""
    try:
        if cfg.text is not None:
            from poeem.model.text import TextTwoTowerModel

            return TextTwoTowerModel(cfg, int(shapes["num_items"]), item_counts)
        return TwoTowerModel(
            cfg,
            int(shapes["num_queries"]),
            int(shapes["num_items"]),
            int(shapes["num_query_features"]),
            int(shapes["num_item_features"]),
            item_counts,
            tables_on_meta,
            replay_init,
        )
    except PoeemError:
        raise  # a setting that does not fit the data, e.g. model.poeem.num_items
    except (KeyError, TypeError, ValueError) as err:
        raise PoeemError("run config 'shapes'", "the model's vocabulary sizes", repr(err), FIX_RUN) from None


def served_model_config(cfg: RunConfig) -> ModelConfig:
    """The model a finished run holds: as configured, except a layer refitted after training
    (``train.refit``), whose settings change with its quantizer (:func:`refit_settings`)."""
    if cfg.train.refit is None or cfg.model.poeem is None:
        return cfg.model
    return replace(cfg.model, poeem=refit_settings(cfg.model.poeem, cfg.train.refit))


def save_run(run_dir: Path, cfg: RunConfig, shapes: dict[str, int], artifacts: RunArtifacts) -> None:
    """Write ``config.json``, ``ids.json`` and ``features.safetensors`` (each atomically)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, cfg, shapes)
    keys = {"queries": artifacts.query_keys, "items": artifacts.item_keys}
    atomic_write_json(
        run_dir / "ids.json", {k: v.to_json() if v is not None else None for k, v in keys.items()}
    )
    features = {"query": artifacts.query_features, "item": artifacts.item_features}
    present = {k: v for k, v in features.items() if v is not None}
    if present:
        save_tensors(run_dir / "features.safetensors", present)


def save_config(run_dir: Path, cfg: RunConfig, shapes: dict[str, int]) -> None:
    """Write ``config.json`` (the run's config and its model's shapes) atomically."""
    atomic_write_json(run_dir / "config.json", {**cfg.to_dict(), "shapes": shapes})


def save_weights(
    run_dir: Path,
    model: torch.nn.Module,
    as_trained: torch.nn.Module | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model.safetensors`` atomically, and the layer as trained (``as_trained``, when the
    model serves a refit of it) to ``index_as_trained.safetensors``; without it, a stale one of an
    earlier refit is deleted. ``metadata``: strings stored in the file's header (a sharded run
    names its tables there: :mod:`poeem.training.table_sharding`)."""
    save_tensors(run_dir / "model.safetensors", model.state_dict(), metadata)
    if as_trained is not None:
        save_tensors(run_dir / AS_TRAINED, as_trained.state_dict())
    else:
        (run_dir / AS_TRAINED).unlink(missing_ok=True)


def read_config(run_dir: Path) -> tuple[RunConfig, dict[str, Any]]:
    """The run's :class:`RunConfig` and the raw dict (with ``shapes``) of ``config.json``."""
    raw = read_json(run_dir / "config.json", "run config", FIX_RUN)
    if not isinstance(raw, dict):
        raise PoeemError("run config", "a JSON object", type(raw).__name__, FIX_RUN)
    train = raw.get("train")
    stored = {
        **raw,
        "train": {"refit": None, **train} if isinstance(train, dict) else train,
    }  # older: no refit
    return RunConfig.from_dict(stored), raw


def read_artifacts(run_dir: Path) -> RunArtifacts:
    """The ids and features saved with a run (runs of dense-id data have neither)."""
    out = RunArtifacts()
    if (run_dir / "ids.json").is_file():
        raw = read_json(run_dir / "ids.json", "run id maps", FIX_RUN)
        if not isinstance(raw, dict):
            raise PoeemError("run id maps", "a JSON object", type(raw).__name__, FIX_RUN)
        if raw.get("queries") is not None:
            out.query_keys = IdMap.from_json(raw["queries"], "run query ids")
        if raw.get("items") is not None:
            out.item_keys = IdMap.from_json(raw["items"], "run item ids")
    if (run_dir / "features.safetensors").is_file():
        feats = read_tensors(run_dir / "features.safetensors", "run features", FIX_RUN, mmap=True)
        out.query_features, out.item_features = feats.get("query"), feats.get("item")
    return out


def load_run(
    run_dir: str | Path,
    device: torch.device | str = "cpu",
    as_trained: bool = False,
    item_share: bool = False,
) -> tuple[RunConfig, RetrievalModel]:
    """The config and the trained model (eval mode) of a finished run.

    With ``as_trained``, a run that serves a refit of its layer (``train.refit``) is loaded with
    the layer as training left it instead (``index_as_trained.safetensors``), and its config
    reads as if trained with ``--refit none``; other runs load as they are.

    With ``item_share``, a run whose tables were sharded (``--table-sharding``) holds only this
    process's share of the item rows (:func:`poeem.distributed.shard`, a :class:`TableRows`):
    what each rank of a per-rank export encodes."""
    run_dir = require_folder(run_dir, "run folder", FIX_RUN)
    for name in ("config.json", "model.safetensors"):
        if not (run_dir / name).is_file():
            raise PoeemError("run folder", f"'{name}' inside '{run_dir}'", "it is missing", FIX_RUN)
    cfg, raw = read_config(run_dir)
    weights = read_tensors(run_dir / "model.safetensors", "run weights", FIX_RUN)
    tables = run_tables(run_dir)  # saved by the ranks of a sharded run
    if as_trained and cfg.train.refit is not None and cfg.model.poeem is not None:
        if not (run_dir / AS_TRAINED).is_file():
            raise PoeemError(
                "the index as trained",
                f"'{AS_TRAINED}' inside '{run_dir}'",
                "it is missing (the run was refitted before poeem kept its index as trained)",
                "train the run again with --refit none",
            )
        layer = read_tensors(run_dir / AS_TRAINED, "the index as trained", FIX_RUN)
        weights = {k: v for k, v in weights.items() if not k.startswith("index.")}
        weights |= {f"index.{k}": v for k, v in layer.items()}
        cfg = replace(cfg, train=replace(cfg.train, refit=None))
    item_share = item_share and tables.keys() == {"query_tower", "item_tower"}
    shapes = raw.get("shapes") or {}
    model = build_model(served_model_config(cfg), shapes, tables_on_meta=item_share, replay_init=False)
    check_saved_tables(model, tables)  # before any row is read
    saved_items = tables.pop("item_tower") if item_share else None
    weights |= whole_tables(tables)
    if saved_items is not None:  # the query table whole (an index keeps its tower), the items' in part
        share = distributed.shard(saved_items.rows)
        rows = saved_items.read(share.start, share.stop - share.start)[0]
        query = weights["query_tower.embedding.weight"]
        model.query_tower.embedding = torch.nn.Embedding.from_pretrained(query, freeze=False)  # type: ignore[union-attr]
        model.item_tower.embedding = TableRows(share.start, rows, saved_items.rows)  # type: ignore[union-attr]
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise PoeemError("run weights", "weights matching config.json", str(err)[:200], FIX_RUN) from None
    return cfg, model.to(device).eval()


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json`` atomically."""
    atomic_write_json(run_dir / "metrics.json", metrics)
