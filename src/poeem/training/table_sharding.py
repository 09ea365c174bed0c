"""Id tables sharded row-wise over the torchrun processes (``train.table_sharding = "torchrec"``).

Each tower's table becomes a :class:`~poeem.model.sharded_tables.ShardedIdTable`: a rank holds
its rows and their row-wise Adagrad sums, the optimizer step runs in the backward pass, and
DistributedDataParallel trains everything else. A save writes each rank's rows to
``<folder>/<tag>/`` (:func:`save_tables`) and then names that tag in one atomic write (the
checkpoint's metadata, or the run's ``tables.json``); the tags before it are deleted then. The
rest of the model is saved as in any run, without the tables.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from poeem import distributed
from poeem.errors import PoeemError
from poeem.model.sharded_tables import ShardedIdTable, TableShards, save_table_shards, torchrec_available
from poeem.storage import atomic_write_json, read_json
from poeem.training.config import TrainConfig

TOWERS = ("query_tower", "item_tower")  # the towers whose id table (``.embedding``) is sharded
RUN_TABLES = "tables"  # a finished run's tables: <run>/tables/<tag>/, named by <run>/tables.json
FIX = "train the run again (its saved tables are incomplete)"


def check_table_sharding(cfg: TrainConfig, has_id_tables: bool, table_dtype: str) -> None:
    """Refuse, before training, a ``table_sharding`` that cannot run here."""
    if cfg.table_sharding == "none":
        return
    problems = [
        (
            not distributed.is_active(),
            "torchrun (several processes)",
            "one process",
            "add --nproc 2 (or more)",
        ),
        (not torchrec_available(), "torchrec installed", "no torchrec", "install it (docs/distributed.md)"),
        (not has_id_tables, "id towers", "text towers", "drop --table-sharding"),
        (
            cfg.table_optimizer != "rowwise_adagrad",
            "--table-optimizer rowwise_adagrad (TorchRec fuses it)",
            repr(cfg.table_optimizer),
            "pass --table-optimizer rowwise_adagrad",
        ),
        (cfg.weight_decay > 0, "no weight decay", repr(cfg.weight_decay), "drop --weight-decay"),
        (table_dtype != "float32", "float32 tables", table_dtype, "drop --table-dtype"),
    ]
    for failed, expected, received, fix in problems:
        if failed:
            raise PoeemError("--table-sharding torchrec", expected, received, fix)


def sharded_tables(model: nn.Module) -> dict[str, ShardedIdTable]:
    """The model's sharded tables, by tower name ({} for a model without any)."""
    towers = ((name, getattr(model, name, None)) for name in TOWERS)
    return {
        name: tower.embedding
        for name, tower in towers
        if tower is not None and isinstance(getattr(tower, "embedding", None), ShardedIdTable)
    }


def shard_id_tables(model: nn.Module, cfg: TrainConfig) -> None:
    """Replace each tower's id table by a sharded one, holding the same initial rows."""
    lr = cfg.lr if cfg.table_lr is None else cfg.table_lr
    for name in TOWERS:
        tower = getattr(model, name)
        weight = tower.embedding.weight.detach()
        tower.embedding = ShardedIdTable(weight.shape[0], weight.shape[1], lr=lr, init=weight)
        del weight  # each rank keeps only its own rows


@contextmanager
def without_sharded_tables(model: nn.Module) -> Iterator[None]:
    """The model with its sharded tables taken out, for ``state_dict`` and ``load_state_dict`` of
    everything else (TorchRec's state dict does not nest in a model)."""
    tables = sharded_tables(model)
    for name in tables:
        getattr(model, name).embedding = nn.Identity()
    try:
        yield
    finally:
        for name, table in tables.items():
            getattr(model, name).embedding = table


def save_tables(model: nn.Module, folder: Path, tag: str) -> None:
    """Every rank writes its rows of each sharded table to ``folder/tag/`` (a collective call)."""
    for name, table in sharded_tables(model).items():
        save_table_shards(table, folder / tag, name)


def load_tables(model: nn.Module, folder: Path, tag: str) -> None:
    """Every rank loads its rows of each sharded table from ``folder/tag/``, saved by any number
    of ranks."""
    for name, table in sharded_tables(model).items():
        table.load_shards(TableShards(folder / tag, name))


def drop_other_tags(folder: Path, tag: str) -> None:
    """Delete the saves in ``folder`` other than ``tag`` (rank 0, once ``tag`` is named)."""
    if distributed.is_main() and folder.is_dir():
        for old in folder.iterdir():
            if old.is_dir() and old.name != tag:
                shutil.rmtree(old, ignore_errors=True)


def save_run_tables(run_dir: Path, model: nn.Module, tag: str) -> None:
    """A finished run's tables: saved by every rank, then named in ``run_dir/tables.json``."""
    save_tables(model, run_dir / RUN_TABLES, tag)
    if distributed.is_main():
        atomic_write_json(run_dir / f"{RUN_TABLES}.json", {"tag": tag, "towers": list(sharded_tables(model))})
        drop_other_tags(run_dir / RUN_TABLES, tag)
    distributed.barrier()


def run_table_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """A run's sharded tables as whole ``<tower>.embedding.weight`` tensors (one process reads
    them all; {} for a run whose tables are in ``model.safetensors``)."""
    named = run_dir / f"{RUN_TABLES}.json"
    if not named.is_file():
        return {}
    index = read_json(named, "run tables", FIX)
    try:
        tag, towers = str(index["tag"]), [str(t) for t in index["towers"]]
    except (KeyError, TypeError) as err:
        raise PoeemError("run tables", "tag and towers", repr(err), FIX) from None
    weights = {}
    for name in towers:
        saved = TableShards(run_dir / RUN_TABLES / tag, name)
        weights[f"{name}.embedding.weight"] = saved.read(0, saved.rows)[0]
    return weights
