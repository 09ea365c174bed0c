"""The one query encoder: (nq, dim) query embeddings from whatever a query is given as.

A query is a query id (with optional numeric features), a text, or an embedding. The same
encoder serves evaluation and distillation (a trained model, by data row:
:meth:`QueryEncoder.from_model`) and search and serving (the query tower an index directory
saved: :attr:`poeem.search.reader.IndexReader.queries`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from poeem.errors import PoeemError
from poeem.ids import IdMap, known_rows, raw_id_array
from poeem.metric import prepare_queries

if TYPE_CHECKING:
    from poeem.data import InteractionData
    from poeem.model.retrieval import RetrievalModel

TowerFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass
class Query:
    """One query of a search request: a query id (with optional features), an embedding or a text."""

    id: Any = None
    features: list[float] | None = None
    embedding: list[float] | None = None
    text: str | None = None
    exclude: list[Any] = field(default_factory=list)


class QueryEncoder:
    """Query ids, texts or embeddings -> (nq, dim) float32 query embeddings on CPU, as the model
    scores them.

    Args:
        dim: the embedding size.
        tower: (nq,) int64 rows and (nq, F) features or None -> (nq, dim) embeddings; None when
            queries cannot be given by id.
        num_ids: rows the tower knows (ids are checked against it when ``keys`` is None).
        num_features: F, numeric features per query the tower takes (0: none).
        features: (num_ids, F) saved features of each row, used when a caller passes none.
        keys: the raw query id of each row; None when the ids are the rows.
        normalize: L2-normalise the tower's output (a cosine model's saved tower).
        text: (nq,) texts -> (nq, dim) embeddings; None when queries cannot be given as text.
    """

    def __init__(
        self,
        dim: int,
        tower: TowerFn | None = None,
        num_ids: int = 0,
        num_features: int = 0,
        features: torch.Tensor | None = None,
        keys: IdMap | None = None,
        normalize: bool = False,
        text: Callable[[list[str]], torch.Tensor] | None = None,
    ) -> None:
        self.dim, self.tower, self.num_ids, self.num_features = dim, tower, num_ids, num_features
        self.features, self.keys, self.normalize, self.text = features, keys, normalize, text

    @classmethod
    def from_model(cls, model: RetrievalModel, data: InteractionData) -> QueryEncoder:
        """The encoder of a trained model's queries, by the rows of its data (evaluation and
        distillation); the model stays where it is and results come back on CPU."""
        device = model.item_log_q.device
        feats = torch.from_numpy(data.query_features) if data.query_features is not None else None

        def tower(rows: torch.Tensor, f: torch.Tensor | None) -> torch.Tensor:
            return model.encode_queries(rows.to(device), None if f is None else f.to(device)).cpu()

        return cls(
            model.config.dim,
            tower,
            num_ids=data.num_queries,
            num_features=0 if feats is None else feats.shape[1],
            features=feats,
        )

    def rows(self, query_ids: Any) -> torch.Tensor:
        """(nq,) int64 rows of the queries' own ids; unknown ids are an error."""
        if self.tower is None:
            raise PoeemError(
                "query ids",
                "an index exported with its query tower",
                "an index without one",
                "search with query embeddings (.npy), or export from a training run",
            )
        return known_rows(query_ids, self.keys, self.num_ids, "query")

    @torch.no_grad()
    def by_rows(self, rows: np.ndarray | torch.Tensor, features: Any = None) -> torch.Tensor:
        """Embeddings of (nq,) tower rows (the data's internal query rows).

        Args:
            features: (nq, F) numeric features of these queries; by default the saved features
                of each row. Needed iff the tower takes features.
        """
        assert self.tower is not None, "by_rows needs a tower"
        rows = torch.as_tensor(rows, dtype=torch.long)
        if features is not None and not self.num_features:
            raise PoeemError(
                "query features",
                "none: this index's query tower takes no features",
                f"{len(features)} feature rows",
                "search by query id alone",
            )
        feats = None
        if self.num_features:
            if features is not None:
                feats = prepare_queries(features, "ip", self.num_features, "query features")
            elif self.features is not None:
                feats = self.features[rows]
            else:
                raise PoeemError(
                    "query features",
                    f"{self.num_features} features per query",
                    "none given and none saved in the index",
                    "pass the query features, or export the index from its training run",
                )
        q = self.tower(rows, feats)
        return F.normalize(q, dim=-1) if self.normalize else q

    def by_ids(self, query_ids: Any, features: Any = None) -> torch.Tensor:
        """Embeddings of (nq,) queries by their own ids, with optional (nq, F) features."""
        return self.by_rows(self.rows(query_ids), features)

    def by_texts(self, texts: list[str]) -> torch.Tensor:
        """Embeddings of (nq,) query texts."""
        if self.text is None:
            raise PoeemError(
                "query text",
                "an index exported from a text model (with its query encoder)",
                "an index without a text query encoder",
                "use query ids or embeddings, or export a run trained with --data beir again",
            )
        return self.text(texts)

    def by_embeddings(self, embeddings: Any) -> torch.Tensor:
        """(nq, dim) query embeddings, checked for shape and finiteness."""
        return prepare_queries(embeddings, "ip", self.dim)

    def encode(self, queries: Sequence[Query]) -> torch.Tensor:
        """(nq, dim) embeddings of a mixed list of queries, in their order. Features go on every
        query given by id or on none (the saved ones are used then)."""
        xq = torch.zeros(len(queries), self.dim)
        given = [i for i, q in enumerate(queries) if q.embedding is not None]
        if given:
            xq[given] = self.by_embeddings([queries[i].embedding for i in given])
        texts = [i for i, q in enumerate(queries) if q.text is not None]
        if texts:
            xq[texts] = self.by_texts([str(queries[i].text) for i in texts])
        by_id = [i for i, q in enumerate(queries) if q.id is not None]
        if by_id:
            with_features = [queries[i].features is not None for i in by_id]
            if any(with_features) and not all(with_features):
                raise PoeemError(
                    "queries",
                    "features on every query id of a request, or on none",
                    f"{sum(with_features)} of {len(by_id)}",
                    "send the features of every query, or none (the saved ones are used)",
                )
            features = None
            if all(with_features):
                features = prepare_queries(
                    [queries[i].features for i in by_id], "ip", None, "query features"
                ).numpy()
            xq[by_id] = self.by_ids(raw_id_array([queries[i].id for i in by_id]), features)
        return xq
