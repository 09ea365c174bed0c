"""Deterministic mini-batches of training pairs: the order is a function of (seed, epoch),
so a resumed run sees exactly the batches an uninterrupted one would.

Under torch.distributed the batch size is the global one: rank r of N takes the r-th
contiguous share of each batch, a function of (seed, epoch, rank, N). The same run on another
number of processes therefore sees the same global batches, and a checkpoint resumes on any
world size that divides the batch size."""

from __future__ import annotations

import numpy as np
import torch

from poeem import distributed
from poeem.data.interactions import InteractionData
from poeem.errors import PoeemError


class PairBatches:
    """Shuffled (query, item) batches of an :class:`InteractionData`, as tensors on ``device``,
    optionally with ``random_negatives`` uniformly sampled items (``negative_ids``) per batch.

    Under torch.distributed each rank gets ``batch_size / world_size`` rows of every batch (the
    negatives are shared). The number of batches per epoch depends on the global batch only, so
    step s is the same batch on any number of processes; only the epoch's last, short batch is
    cut to a multiple of the world size (at most N - 1 pairs skipped), or, when it is shorter
    than N, replaced by the epoch's first N pairs.
    """

    def __init__(
        self,
        data: InteractionData,
        batch_size: int,
        seed: int,
        device: torch.device | str = "cpu",
        random_negatives: int = 0,
    ) -> None:
        self.data, self.batch_size, self.seed, self.device = data, batch_size, seed, device
        self.random_negatives = random_negatives
        self.queries = torch.from_numpy(data.train_queries)
        self.items = torch.from_numpy(data.train_items)
        qf, itf = data.query_features, data.item_features
        self.query_features = torch.from_numpy(qf) if qf is not None else None
        self.item_features = torch.from_numpy(itf) if itf is not None else None
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        if batch_size % self.world_size:
            raise PoeemError(
                "batch size",
                f"a multiple of the number of processes ({self.world_size})",
                str(batch_size),
                "it is the global batch, split across processes; pick a multiple",
            )
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        """Batches per epoch: a function of the data and the global batch size only."""
        return -(-self.data.num_train // self.batch_size)

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch``: ``query_ids`` (B,), ``item_ids`` (B,), and features;
        under torch.distributed B is this rank's share."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = torch.from_numpy(rng.permutation(self.data.num_train))
            self._epoch = epoch
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
        if self.world_size > 1:
            usable = rows.shape[0] - rows.shape[0] % self.world_size
            rows = rows[:usable] if usable else self._order[: self.world_size]
            share = rows.shape[0] // self.world_size
            rows = rows[self.rank * share : (self.rank + 1) * share]
        q, i = self.queries[rows], self.items[rows]
        batch = {"query_ids": q, "item_ids": i}
        if self.query_features is not None:
            batch["query_features"] = self.query_features[q]
        if self.item_features is not None:
            batch["item_features"] = self.item_features[i]
        if self.random_negatives:
            rng = np.random.default_rng([self.seed, epoch, index, 1])
            negatives = torch.from_numpy(rng.integers(0, self.data.num_items, self.random_negatives))
            batch["negative_ids"] = negatives
            if self.item_features is not None:
                batch["negative_features"] = self.item_features[negatives]
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
