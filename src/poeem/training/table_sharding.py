"""Id tables sharded row-wise over the torchrun processes (``train.table_sharding = "torchrec"``).

Each tower's table becomes a :class:`~poeem.model.sharded_tables.ShardedIdTable`: a rank holds
its rows and their row-wise Adagrad sums, the optimizer step runs in the backward pass, and
DistributedDataParallel trains everything else. A save writes each rank's rows to
``<folder>/<tag>/`` (:func:`save_tables`), and rank 0 then names that tag in the metadata of
the one file it writes atomically (``checkpoint.safetensors``, or ``model.safetensors``: the
commit point); the tags before it are deleted after that. The rest of the model is saved as in
any run, without the tables.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from poeem import distributed
from poeem.errors import PoeemError
from poeem.model.sharded_tables import ShardedIdTable, TableShards, save_table_shards, torchrec_available
from poeem.storage import inside
from poeem.training.config import TrainConfig

TOWERS = ("query_tower", "item_tower")  # the towers whose id table (``.embedding``) is sharded
RUN_TABLES = "tables"  # a finished run's tables: <run>/tables/<tag>/, named by model.safetensors
FIX = "restore the run folder's tables, or train the run again"


def check_table_sharding(
    cfg: TrainConfig, has_id_tables: bool, table_dtype: str, device: torch.device | None = None
) -> None:
    """Refuse, before training, a ``table_sharding`` that cannot run here."""
    if cfg.table_sharding == "none":
        return
    problems = [
        (
            device is not None and device.type != "cpu",
            "the CPU (TorchRec's CPU kernels; CUDA is not wired yet)",
            str(device),
            "pass --device cpu",
        ),
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
    """Replace each tower's id table by a sharded one, holding the same initial rows: copied from
    a whole table, or, for a tower built with ``table_on_meta``, drawn for this rank's rows alone
    (:meth:`poeem.model.towers.Tower.table_rows`)."""
    lr = cfg.lr if cfg.table_lr is None else cfg.table_lr
    for name in TOWERS:
        tower = getattr(model, name)
        rows, dim = tower.embedding.num_embeddings, tower.embedding.embedding_dim
        init = tower.table_rows if tower.table_rng is not None else tower.embedding.weight.detach()
        tower.embedding = ShardedIdTable(rows, dim, lr=lr, init=init)


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


def load_tables(model: nn.Module, folder: Path, tag: object) -> None:
    """Every rank loads its rows of each sharded table from ``folder/tag/``, saved by any number
    of ranks (``tag``, read from a checkpoint, must name a folder inside ``folder``)."""
    saved = inside(folder, tag, "the tables a checkpoint names", FIX)
    for name, table in sharded_tables(model).items():
        table.load_shards(TableShards(saved, name))


def save_with_tables(model: nn.Module, folder: Path, step: int, write_rest: Callable[[str], None]) -> None:
    """Save a model with sharded tables, every rank at once (a collective call): each rank writes
    its rows to ``folder/<tag>/`` under a new tag, then rank 0 calls ``write_rest(tag)``, which
    writes the rest of the model (its tables taken out) in one atomic file that names the tag:
    the commit point. The saves before it are deleted after that."""
    tag = new_tag(step)
    save_tables(model, folder, tag)
    if distributed.is_main():
        with without_sharded_tables(model):
            write_rest(tag)
        if folder.is_dir():
            for old in folder.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def new_tag(step: int) -> str:
    """A name for one save, the same on every rank and never used before (the step, and a token
    rank 0 draws), so that no save rewrites the files an earlier one committed."""
    return distributed.from_rank0(f"step-{step:012d}-{secrets.token_hex(4)}")


def tables_metadata(towers: list[str], tag: str) -> dict[str, str]:
    """What a saved model names of its sharded tables (safetensors metadata): the tag, and the towers."""
    return {"tables": json.dumps({"tag": tag, "towers": towers})}


def run_tables(run_dir: Path) -> dict[str, TableShards]:
    """The sharded tables a run's ``model.safetensors`` names, by tower ({} for a run whose
    tables are in ``model.safetensors`` itself)."""
    path = run_dir / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            named = (f.metadata() or {}).get("tables")
    except (SafetensorError, OSError):
        return {}  # load_run reports the unreadable file itself
    if named is None:
        return {}
    try:
        index = json.loads(named)
        tag, towers = index["tag"], index["towers"]
    except (ValueError, KeyError, TypeError) as err:
        raise PoeemError("run tables", "a tag and towers in model.safetensors", repr(err), FIX) from None
    known = isinstance(towers, list) and all(t in TOWERS for t in towers)
    if not known or len(set(towers)) != len(towers):  # each tower once
        raise PoeemError("run tables", f"towers among {list(TOWERS)}", repr(towers)[:200], FIX)
    folder = inside(run_dir, RUN_TABLES, "run tables", FIX)
    saved = inside(folder, tag, "the tables model.safetensors names", FIX)
    return {name: TableShards(saved, name) for name in towers}


def check_saved_tables(model: nn.Module, tables: dict[str, TableShards]) -> None:
    """Refuse saved tables (``run_tables``) of other shapes than the model's id tables, before
    any row is read."""
    for name, saved in tables.items():
        table = getattr(getattr(model, name, None), "embedding", None)
        if table is None:
            raise PoeemError("run tables", "id towers, as config.json gives", f"a table of '{name}'", FIX)
        saved.require_shape(table.num_embeddings, table.embedding_dim, FIX)


def whole_tables(tables: dict[str, TableShards]) -> dict[str, torch.Tensor]:
    """Saved tables (``run_tables``) read whole, as ``<tower>.embedding.weight`` tensors."""
    return {f"{name}.embedding.weight": t.read(0, t.rows)[0] for name, t in tables.items()}


def unshard_id_tables(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Put whole tables (``whole_tables``) back in the towers of a sharded model, on the model's
    device: one process then evaluates and exports it like any model."""
    for name in sharded_tables(model):
        rows = weights[f"{name}.embedding.weight"]
        getattr(model, name).embedding = nn.Embedding.from_pretrained(rows, freeze=False)
