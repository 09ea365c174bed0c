"""The retrieval model every tower kind shares: in-batch softmax over query and item
embeddings, with an optional :class:`PoeemLayer` at the end of the item tower."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from poeem import distributed
from poeem.errors import PoeemError
from poeem.index import PoeemConfig, PoeemLayer
from poeem.index.config import fitted_codes
from poeem.model.config import ModelConfig
from poeem.model.loss import in_batch_softmax
from poeem.model.towers import Tower


class RetrievalModel(nn.Module):
    """Base of the two-tower models: subclasses define :meth:`encode_queries` and
    :meth:`encode_items`; training, the index and bulk item encoding live here.

    Scores are <q, x_hat> / temperature where x_hat is the item tower's output after the
    Poeem layer (if any); with cosine scoring q and the item embedding are L2-normalised
    before the layer, so the index is searched by inner product with normalised queries.
    """

    def __init__(self, config: ModelConfig, num_items: int, item_counts: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = c = config
        self.index: PoeemLayer | None = None
        if c.poeem is not None:
            # the layer remembers each item's codes from training, for the export (num_items 0: off)
            remembered = c.poeem.get("num_items", num_items)
            if remembered not in (0, num_items):
                raise PoeemError(
                    "model.poeem.num_items",
                    f"0 (no trained codes) or the catalogue size {num_items}",
                    repr(remembered),
                    "leave it out: the model sets it",
                )
            settings = {"dim": c.dim, **c.poeem, "num_items": remembered, "schedule": c.index_schedule}
            if c.index_schedule == "after_training":  # fitted after training: 8-bit codes
                settings.update(fitted_codes(c.poeem))
            self.index = PoeemLayer(PoeemConfig(**settings))
        counts = item_counts if item_counts is not None else torch.ones(num_items)
        self.register_buffer("item_log_q", (counts.float() / counts.sum()).clamp_min(1e-12).log())

    @property
    def num_items(self) -> int:
        """Size of the item vocabulary."""
        return self.item_log_q.shape[0]

    def id_tables(self) -> list[nn.Embedding]:
        """The id embedding tables of the towers (the rows a sparse optimizer updates); tables
        sharded over ranks step themselves and are not among them."""
        return [
            m.embedding
            for m in self.modules()
            if isinstance(m, Tower) and isinstance(m.embedding, nn.Embedding)
        ]

    def encode_queries(self, ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) query ids (+ (B, Fq) features) -> (B, dim) query embeddings, as searched."""
        raise NotImplementedError

    def encode_items(self, ids: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) item ids (+ (B, Fi) features) -> (B, dim) un-quantized item embeddings, the
        Poeem layer's input."""
        raise NotImplementedError

    def _normalized(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.config.score == "cosine" else x

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One training step's losses.

        Args:
            batch: ``query_ids`` (B,), ``item_ids`` (B,), optional ``query_features`` (B, Fq)
                and ``item_features`` (B, Fi), and optional extra negatives ``negative_ids``
                (N,) with ``negative_features`` (N, Fi). Under torch.distributed B is this
                rank's share; with ``cross_rank_negatives`` the queries are scored against the
                positives of all ranks (gathered with gradient).

        Returns:
            ``loss`` (task + index), ``task_loss``, ``index_loss`` (distortion regularizer,
            routing and balance terms) and ``routing_loss`` (:meth:`log_stats` adds the index
            health of the step, for the steps that are logged). The task
            loss scores the items :meth:`PoeemLayer.task_items` names: the quantized ones, and
            (``unquantized_loss_weight``) the un-quantized ones, every step or in turn.
        """
        q = self.encode_queries(batch["query_ids"], batch.get("query_features"))
        positives = batch["item_ids"]
        item_ids, item_features = positives, batch.get("item_features")
        negatives = batch.get("negative_ids")
        if negatives is not None:
            item_ids = torch.cat([item_ids, negatives])
            if item_features is not None:
                item_features = torch.cat([item_features, batch["negative_features"]])
        x = self.encode_items(item_ids, item_features)
        out: dict[str, torch.Tensor] = {}
        index_loss = q.new_zeros(())
        scored = [(1.0, x)]
        if self.index is not None:
            res = self.index(x, item_ids)
            scored, index_loss = self.index.task_items(x, res), res.loss
            if res.coarse_codes is not None:
                routing = self.index.routing_loss(q, res.coarse_codes[: positives.shape[0]])
                index_loss = index_loss + routing
                out["routing_loss"] = routing.detach()
        task = sum(w * self._task_loss(q, items, positives, item_ids) for w, items in scored)
        out.update(loss=task + index_loss, task_loss=task.detach(), index_loss=index_loss.detach())
        return out

    def warm_start_on_catalogue(self, item_features: torch.Tensor | None = None) -> None:
        """Let the layer's warm start fit a uniform sample of the whole catalogue (each item
        once), embedded by this model, instead of the items that batches bring.

        Args:
            item_features: (num_items, Fi) features of every item, or None.
        """
        if self.index is not None:
            self.index.item_embedder = lambda ids: self.all_item_embeddings(item_features, rows=ids)

    def log_stats(self) -> dict[str, float]:
        """The index health of the last training step (distortion, code and list usage), for a
        logged step; empty without a layer or before it quantizes."""
        return self.index.stats() if self.index is not None else {}

    def _task_loss(
        self, q: torch.Tensor, x: torch.Tensor, positives: torch.Tensor, item_ids: torch.Tensor
    ) -> torch.Tensor:
        """In-batch softmax of queries (B, dim) against items x (B + N, dim): positives, then
        extra negatives; across ranks with ``cross_rank_negatives``."""
        b, offset = positives.shape[0], 0
        if self.config.cross_rank_negatives and distributed.is_active():
            offset = distributed.rank() * b
            x = torch.cat([distributed.gather_with_grad(x[:b]), x[b:]])
            positives = distributed.gather_rows(positives)
            item_ids = torch.cat([positives, item_ids[b:]])
        log_q = None
        if self.config.logq_correction:
            n_neg = item_ids.shape[0] - positives.shape[0]
            uniform = torch.full((n_neg,), -math.log(self.num_items), device=q.device)
            log_q = torch.cat([self.item_log_q[positives], uniform])
        return in_batch_softmax(q / self.config.temperature, x, item_ids, log_q, offset)

    @torch.no_grad()
    def all_item_embeddings(
        self,
        item_features: torch.Tensor | None = None,
        batch_size: int = 65536,
        rows: slice | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(num_items, dim) un-quantized embeddings of every item, in id order.

        Args:
            item_features: (num_items, Fi) features of every item, or None.
            batch_size: items embedded at once.
            rows: a contiguous range of item ids (e.g. this rank's share), or (n,) item ids;
                all items by default.

        Returns:
            (len(rows), dim) embeddings of those items.
        """
        device = self.item_log_q.device
        if not isinstance(rows, torch.Tensor):
            rows = torch.arange(*(rows or slice(None)).indices(self.num_items))
        out: torch.Tensor | None = None  # filled in place: one copy of the embeddings, never two
        for lo in range(0, rows.shape[0], batch_size):
            ids = rows[lo : lo + batch_size].to(device)
            feats = item_features[ids.cpu()].to(device) if item_features is not None else None
            x = self.encode_items(ids, feats)
            if out is None:
                out = x.new_empty(rows.shape[0], x.shape[1])
            out[lo : lo + x.shape[0]] = x
        return out if out is not None else torch.zeros(0, self.config.dim, device=device)
