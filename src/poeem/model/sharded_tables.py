"""Id tables larger than one process, sharded row-wise across ranks by TorchRec (optional).

Needs the ``torchrec`` extra (docs/distributed.md: torchrec 1.8.0 with fbgemm-gpu-cpu 1.8.0,
the pairing that loads with torch 2.13 on CPU) and an initialised torch.distributed group.
Each rank stores only its rows and their row-wise Adagrad state; a lookup sends every id to the
rank that owns it (TorchRec's all-to-all), and the optimizer step is fused into the backward
pass (FBGEMM's exact row-wise Adagrad, the update of :class:`poeem.training.RowWiseAdagrad`).

Saved, each rank writes its own rows and their Adagrad sums (:func:`save_table_shards`:
safetensors files and a JSON list of them, no pickle), and no rank ever holds the whole table;
:class:`TableShards` reads any row range back, so a table saved by N ranks loads on any number
of ranks (:meth:`ShardedIdTable.load_shards`) or whole in one process.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from poeem import distributed
from poeem.errors import PoeemError
from poeem.storage import atomic_write_json, inside, read_json, read_tensors, save_tensors, tensor_specs

INIT_BLOCK = 65536  # rows per seeded block of the default initialisation


def seeded_rows(first: int, count: int, dim: int, std: float, seed: int) -> torch.Tensor:
    """Rows ``[first, first + count)`` of a N(0, std) table drawn in blocks of
    :data:`INIT_BLOCK` rows, block b from a generator seeded with ``(seed, b)``: any row range
    is drawn alone, and every split of the table into ranges gives the same table.

    Returns:
        (count, dim) float32.
    """
    out = torch.empty(count, dim)
    end, row = first + count, first
    while row < end:
        block = row // INIT_BLOCK
        g = torch.Generator().manual_seed(seed * 1_000_003 + block)
        values = torch.randn(INIT_BLOCK, dim, generator=g) * std
        stop = min(end, (block + 1) * INIT_BLOCK)
        out[row - first : stop - first] = values[row - block * INIT_BLOCK : stop - block * INIT_BLOCK]
        row = stop
    return out


def torchrec_available() -> bool:
    """Whether torchrec and its CPU kernels (fbgemm_gpu) are installed."""
    return all(importlib.util.find_spec(name) is not None for name in ("torchrec", "fbgemm_gpu"))


class ShardedIdTable(nn.Module):
    """A (rows, dim) id table sharded row-wise over the ranks, trained by fused row-wise Adagrad.

    Args:
        rows: table rows (ids 0..rows-1).
        dim: embedding width.
        lr: row-wise Adagrad learning rate; eps its epsilon.
        init: (rows, dim) initial values (each rank copies its own rows); or a function
            (first, out) that writes rows first.. into ``out`` (n, dim), called with this rank's
            rows only; or None: each rank draws only its own rows, N(0, ``init_std``), by
            :func:`seeded_rows` with ``seed`` (the same table on any number of ranks; no rank
            holds the whole table).
    """

    def __init__(
        self,
        rows: int,
        dim: int,
        lr: float,
        eps: float = 1e-8,
        init: torch.Tensor | Callable[[int, torch.Tensor], None] | None = None,
        init_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not torchrec_available():
            raise PoeemError(
                "sharded id tables", "torchrec installed", "no torchrec", "install it (docs/distributed.md)"
            )
        if not torch.distributed.is_initialized():
            raise PoeemError(
                "sharded id tables", "an initialised process group", "none", "run under torchrun"
            )
        if isinstance(init, torch.Tensor) and tuple(init.shape) != (rows, dim):
            raise PoeemError("init", f"shape ({rows}, {dim})", f"shape {tuple(init.shape)}", "pass the table")
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.types import ShardingType
        from torchrec.optim import RowWiseAdagrad as TorchRecRowWiseAdagrad
        from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

        self.rows, self.dim = rows, dim
        table = EmbeddingConfig(name="table", embedding_dim=dim, num_embeddings=rows, feature_names=["ids"])
        collection = EmbeddingCollection(tables=[table], device=torch.device("meta"))
        apply_optimizer_in_backward(TorchRecRowWiseAdagrad, collection.parameters(), {"lr": lr, "eps": eps})
        world = torch.distributed.get_world_size()
        planner = EmbeddingShardingPlanner(
            topology=Topology(world_size=world, compute_device="cpu"),
            constraints={"table": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])},
        )
        sharders = [EmbeddingCollectionSharder()]
        plan = planner.collective_plan(collection, sharders, torch.distributed.GroupMember.WORLD)
        self.sharded = DistributedModelParallel(
            collection, device=torch.device("cpu"), plan=plan, sharders=sharders
        )
        with torch.no_grad():
            for offset, shard in self._local_shards():
                n = shard.shape[0]
                if isinstance(init, torch.Tensor):
                    shard.copy_(init[offset : offset + n])
                elif init is not None:
                    init(offset, shard)
                else:
                    shard.copy_(seeded_rows(offset, n, dim, init_std, seed))

    @property
    def num_embeddings(self) -> int:
        """Rows of the whole table (as :class:`torch.nn.Embedding` names them)."""
        return self.rows

    @property
    def embedding_dim(self) -> int:
        """Width of a row."""
        return self.dim

    def _local_shards(self) -> list[tuple[int, torch.Tensor]]:
        (weight,) = self.sharded.state_dict().values()
        return [(int(s.metadata.shard_offsets[0]), s.tensor) for s in weight.local_shards()]

    def local_rows(self) -> tuple[int, torch.Tensor]:
        """(first id, (n, dim) copy of the rows) this rank owns."""
        first, rows, _ = self.local_state()
        return first, rows

    def _local_sums(self) -> list[torch.Tensor]:
        """The row-wise Adagrad sum of each local shard's rows (the fused optimizer's state, in
        place), in the order of :meth:`_local_shards`."""
        (state,) = self.sharded.fused_optimizer.state_dict()["state"].values()
        (momentum,) = state.values()
        return [s.tensor for s in momentum.local_shards()]

    def local_state(self) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(first id, (n, dim) rows, (n,) row-wise Adagrad sums) of the rows this rank owns, copied."""
        shards = self._local_shards()
        if not shards:
            return 0, torch.zeros(0, self.dim), torch.zeros(0)
        first = min(offset for offset, _ in shards)
        order = sorted(range(len(shards)), key=lambda i: shards[i][0])
        sums = self._local_sums()
        rows = torch.cat([shards[i][1] for i in order]).detach().clone()
        return first, rows, torch.cat([sums[i] for i in order]).detach().clone()

    def load_shards(self, saved: TableShards) -> None:
        """Set this rank's rows and their Adagrad sums from a saved table of the same shape (saved
        by any number of ranks): training continues exactly where the saved one stopped."""
        saved.require_shape(self.rows, self.dim, "load its own run")
        with torch.no_grad():
            for (offset, shard), sums in zip(self._local_shards(), self._local_sums(), strict=True):
                rows, saved_sums = saved.read(offset, shard.shape[0])
                shard.copy_(rows)
                sums.copy_(saved_sums)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) int64 ids in [0, rows) -> (B, dim) embeddings (this rank's batch)."""
        from torchrec import KeyedJaggedTensor

        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows):
            found = f"ids from {int(ids.min())} to {int(ids.max())}"
            raise PoeemError("ids", f"ids in [0, {self.rows})", found, "pass ids of table rows")
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["ids"], values=ids.long(), lengths=torch.ones_like(ids, dtype=torch.long)
        )
        return self.sharded(features)["ids"].values()


def save_table_shards(table: ShardedIdTable, folder: str | Path, name: str) -> None:
    """Save a sharded table, every rank at once (a collective call): each rank writes its rows and
    their Adagrad sums to ``folder/<name>-<first>.safetensors``, and rank 0 then writes
    ``folder/<name>.json``, the list of the shards. Save each version to a new folder and name
    it in one atomic write afterwards: the folder of the last save stays whole until then.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    first, rows, sums = table.local_state()
    file = f"{name}-{first:012d}.safetensors"
    if rows.shape[0]:
        save_tensors(folder / file, {"rows": rows, "sum": sums})
    parts = [(first, rows.shape[0], file)]
    if distributed.is_active():
        gathered: list[object] = [None] * distributed.world_size()
        torch.distributed.all_gather_object(gathered, parts[0])
        parts = gathered  # type: ignore[assignment]
    if distributed.is_main():
        shards = [{"first": f, "count": n, "file": path} for f, n, path in sorted(parts) if n]  # type: ignore[misc]
        atomic_write_json(folder / f"{name}.json", {"rows": table.rows, "dim": table.dim, "shards": shards})
    distributed.barrier()


class TableShards:
    """A table saved by :func:`save_table_shards`, read by row ranges (files are memory-mapped:
    a range costs only its own rows).

    Opening it checks the list against each file before any row is read: every file lies inside
    ``folder`` and holds float32 ``rows`` (count, dim) and ``sum`` (count,) as the list says, and
    the files cover rows 0..rows-1 without a gap; else a clear error.

    Args:
        folder: where the table was saved; name: its name there.
    """

    FIX = "restore that folder, or train the run again"

    def __init__(self, folder: str | Path, name: str) -> None:
        self.folder, self.name = Path(folder), name
        what = f"sharded table '{name}'"
        index = read_json(inside(self.folder, f"{name}.json", what, self.FIX), what, self.FIX)
        self.rows, self.dim, self.shards = _shard_list(index, what, self.FIX)
        for _, count, file in self.shards:
            path = inside(self.folder, file, f"{what}, shard file", self.FIX)
            _check_shard(path, count, self.dim, f"table shard '{path}'", self.FIX)

    def require_shape(self, rows: int, dim: int, fix: str) -> None:
        """Refuse a saved table of another shape than (rows, dim), the table it is loaded into."""
        if (self.rows, self.dim) != (rows, dim):
            found = f"({self.rows}, {self.dim})"
            what = f"sharded table '{self.name}' in '{self.folder}'"
            raise PoeemError(what, f"shape ({rows}, {dim})", found, fix)

    def read(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[first, first + count)``: ((count, dim) rows, (count,) row-wise Adagrad sums)."""
        rows, sums = torch.empty(count, self.dim), torch.empty(count)
        stop = first + count
        for start, n, file in self.shards:
            lo, hi = max(first, start), min(stop, start + n)
            if lo >= hi:
                continue
            part = read_tensors(self.folder / file, f"table shard '{file}'", self.FIX, mmap=True)
            rows[lo - first : hi - first] = part["rows"][lo - start : hi - start]
            sums[lo - first : hi - first] = part["sum"][lo - start : hi - start]
        return rows, sums


def _count(value: object, least: int) -> int:
    """``value`` if it is an integer of at least ``least`` (not a bool, a float or a string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{value!r} is not an integer >= {least}")
    return value


def _shard_list(index: object, what: str, fix: str) -> tuple[int, int, list[tuple[int, int, str]]]:
    """(rows, dim, [(first, count, file)]) of a table's JSON list, checked: integer sizes, and
    shards covering rows 0..rows-1 in order without a gap."""
    try:
        if not isinstance(index, dict) or not isinstance(index.get("shards"), list):
            raise TypeError("not an object with a list of shards")
        rows, dim = _count(index["rows"], 0), _count(index["dim"], 1)
        shards = [(_count(s["first"], 0), _count(s["count"], 1), s["file"]) for s in index["shards"]]
    except (KeyError, TypeError, ValueError) as err:
        expected = "an object of integer 'rows' and 'dim' and a list of 'shards' ('first', 'count', 'file')"
        raise PoeemError(what, expected, f"{type(err).__name__}: {err}", fix) from None
    covered = 0
    for first, count, _ in shards:
        if first != covered:
            found = f"a gap or overlap at row {covered}"
            raise PoeemError(what, f"shards covering rows 0..{rows}", found, fix)
        covered += count
    if covered != rows:
        raise PoeemError(what, f"shards of {rows} rows, its 'rows'", f"{covered} rows", fix)
    return rows, dim, shards


def _check_shard(path: Path, count: int, dim: int, what: str, fix: str) -> None:
    """Refuse a shard file whose header does not hold float32 ``rows`` (count, dim) and ``sum``
    (count,), as the table's list says (read from the header alone: no row is read)."""
    specs = tensor_specs(path, what, fix)
    for tensor, shape in (("rows", (count, dim)), ("sum", (count,))):
        if tensor not in specs:
            raise PoeemError(what, f"a tensor '{tensor}'", f"tensors {sorted(specs)}", fix)
        if specs[tensor] != ("F32", shape):
            dtype, found = specs[tensor]
            expected = f"'{tensor}' of float32 (F32) and shape {shape}, as the table's list says"
            raise PoeemError(what, expected, f"{dtype} of shape {found}", fix)
