"""Two-tower retrieval model over ids (and numeric features), matrix factorisation at its simplest."""

from __future__ import annotations

import torch

from poeem.model.config import ModelConfig
from poeem.model.retrieval import RetrievalModel
from poeem.model.towers import Tower


class TwoTowerModel(RetrievalModel):
    """A query tower and an item tower of id embeddings (plus optional feature MLPs), trained
    with in-batch softmax; see :class:`RetrievalModel`.

    ``tables_on_meta`` builds the id tables without memory, for tables that each rank then draws
    and holds only in part (:func:`poeem.training.table_sharding.shard_id_tables`); every other
    parameter, and the global random state after the build, are as without it. With
    ``replay_init`` False the tables are not drawn at all (a model whose weights are loaded next)."""

    def __init__(
        self,
        config: ModelConfig,
        num_queries: int,
        num_items: int,
        num_query_features: int = 0,
        num_item_features: int = 0,
        item_counts: torch.Tensor | None = None,
        tables_on_meta: bool = False,
        replay_init: bool = True,
    ) -> None:
        super().__init__(config, num_items, item_counts)
        c = config
        tables = (c.init_std, c.table_dtype, tables_on_meta, replay_init)
        self.query_tower = Tower(num_queries, c.dim, num_query_features, c.query_hidden, *tables)
        self.item_tower = Tower(num_items, c.dim, num_item_features, c.item_hidden, *tables)

    def encode_queries(self, ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) query ids (+ (B, Fq) features) -> (B, dim) query embeddings, as searched."""
        return self._normalized(self.query_tower(ids, features))

    def encode_items(self, ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) item ids (+ (B, Fi) features) -> (B, dim) un-quantized item embeddings, the
        Poeem layer's input."""
        return self._normalized(self.item_tower(ids, features))
