"""A tower: an id embedding table, plus optional numeric side features through an MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from poeem.errors import PoeemError
from poeem.model.config import TableDtype, check_table_dtype

DRAW_CHUNK = 1 << 22  # values per normal_ call when drawing a table by parts (a multiple of 16)


def normal_draws(
    total: int, std: float, generator: torch.Generator, start: int = 0, out: torch.Tensor | None = None
) -> None:
    """Draw ``total`` N(0, std) float32 values from ``generator`` in parts, exactly as one
    ``normal_`` of ``total`` values draws them (parts are multiples of 16 values, and the last
    one at least 16: torch draws in blocks of 16), writing values ``[start, start + out.numel())``
    into ``out`` (nothing is kept without it)."""
    stop = start + (out.numel() if out is not None else 0)
    flat = out.view(-1) if out is not None else None
    done = 0
    while done < total:
        size = min(DRAW_CHUNK, total - done)
        if total - done - size < 16:
            size = total - done
        values = torch.empty(size).normal_(0, std, generator=generator)
        lo, hi = max(start, done), min(stop, done + size)
        if flat is not None and lo < hi:
            flat[lo - start : hi - start] = values[lo - done : hi - done]
        done += size


class TableRows(nn.Module):
    """Rows ``[first, first + n)`` of an id table of ``num_embeddings`` rows, in place of the
    table where a process needs only those: lookups of other ids are an error.

    Args:
        first: the first row's id; rows: (n, dim) the rows; num_embeddings: the table's rows.
    """

    def __init__(self, first: int, rows: torch.Tensor, num_embeddings: int) -> None:
        super().__init__()
        self.first, self.num_embeddings, self.embedding_dim = first, num_embeddings, rows.shape[1]
        self.register_buffer("rows", rows, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B,) ids in ``[first, first + n)`` -> (B, dim) rows."""
        last = self.first + self.rows.shape[0]
        if ids.numel() and (int(ids.min()) < self.first or int(ids.max()) >= last):
            found = f"ids from {int(ids.min())} to {int(ids.max())}"
            raise PoeemError(
                "ids", f"ids in [{self.first}, {last}) (this process's rows)", found, "look up its own rows"
            )
        return self.rows[ids - self.first]


class Tower(nn.Module):
    """Maps an id (and optional numeric features) to a ``dim``-dimensional embedding.

    With no numeric features and no hidden layers this is matrix factorisation's embedding
    table. Numeric features go through an MLP whose output is added to the id embedding; a
    tower built with ``num_numeric > 0`` needs them on every call. The table may be stored in
    bfloat16 (``table_dtype``); its rows are widened to float32 on lookup.
    """

    def __init__(
        self,
        num_ids: int,
        dim: int,
        num_numeric: int = 0,
        hidden: tuple[int, ...] = (),
        init_std: float = 0.1,
        table_dtype: TableDtype = "float32",
        table_on_meta: bool = False,
        replay_init: bool = True,
    ) -> None:
        super().__init__()
        check_table_dtype(table_dtype)
        self.num_numeric, self.hidden, self.table_dtype = num_numeric, tuple(hidden), table_dtype
        self.init_std = init_std
        self.table_rng: torch.Tensor | None = None  # the generator state a meta table replays
        if table_on_meta:  # no memory: rows are drawn (table_rows) or loaded later
            self.embedding = nn.Embedding(num_ids, dim, dtype=getattr(torch, table_dtype), device="meta")
            if replay_init:  # the global generator moves on as the two draws below move it
                self.table_rng = torch.get_rng_state()
                for std in (1.0, init_std):
                    normal_draws(num_ids * dim, std, torch.default_generator)
        else:
            # allocated in its own dtype: a bfloat16 table never exists as float32, even briefly
            self.embedding = nn.Embedding(num_ids, dim, dtype=getattr(torch, table_dtype))
            nn.init.normal_(self.embedding.weight, std=init_std)
        self.numeric: nn.Module | None = None
        if num_numeric:
            layers: list[nn.Module] = []
            width = num_numeric
            for h in hidden:
                layers += [nn.Linear(width, h), nn.ReLU()]
                width = h
            layers.append(nn.Linear(width, dim))
            self.numeric = nn.Sequential(*layers)

    def table_rows(self, first: int, out: torch.Tensor) -> None:
        """Write into ``out`` (count, dim) rows ``[first, first + count)`` of the table a tower
        built without ``table_on_meta`` would hold (the same draws of the same generator state),
        without the rest of the table."""
        assert self.table_rng is not None, "only a tower built with table_on_meta replays its draws"
        g = torch.Generator()
        g.set_state(self.table_rng)
        n, dim = self.embedding.num_embeddings, self.embedding.embedding_dim
        normal_draws(n * dim, 1.0, g)  # nn.Embedding's own initialisation, then ours
        normal_draws(n * dim, self.init_std, g, first * dim, out)

    @property
    def num_ids(self) -> int:
        """Rows of the id embedding table."""
        return self.embedding.num_embeddings

    def config(self) -> dict[str, Any]:
        """The arguments that rebuild this tower (JSON-serialisable); see :meth:`from_config`."""
        return {
            "num_ids": self.num_ids,
            "dim": self.embedding.embedding_dim,
            "num_numeric": self.num_numeric,
            "hidden": list(self.hidden),
            "table_dtype": self.table_dtype,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Tower:
        """A fresh tower shaped like the one :meth:`config` described (load weights after)."""
        try:
            return cls(
                int(config["num_ids"]),
                int(config["dim"]),
                int(config.get("num_numeric", 0)),
                tuple(int(h) for h in config.get("hidden", ())),
                table_dtype=config.get("table_dtype", "float32"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PoeemError(
                "tower config", "num_ids, dim, num_numeric, hidden", f"{config!r} ({err})", "re-export"
            ) from None

    def forward(self, ids: torch.Tensor, numeric: torch.Tensor | None = None) -> torch.Tensor:
        """Args: ids (B,) int64; numeric (B, F) float, required iff the tower has features.

        Returns:
            (B, dim) embeddings.
        """
        out = self.embedding(ids)
        if self.table_dtype != "float32":
            out = out.float()
        if (numeric is None) != (self.numeric is None):
            raise PoeemError(
                "tower features",
                f"{self.num_numeric} numeric features per row" if self.num_numeric else "no features",
                "none" if numeric is None else f"features of shape {tuple(numeric.shape)}",
                "pass the same feature columns the model was trained with",
            )
        if self.numeric is not None and numeric is not None:
            if numeric.dim() != 2 or numeric.shape != (ids.shape[0], self.num_numeric):
                raise PoeemError(
                    "tower features",
                    f"shape ({ids.shape[0]}, {self.num_numeric})",
                    f"shape {tuple(numeric.shape)}",
                    "pass one row of the training feature columns per id",
                )
            out = out + self.numeric(numeric)
        return out
