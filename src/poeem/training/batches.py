"""Deterministic mini-batches of training pairs: the order is a function of (seed, epoch),
so a resumed run sees exactly the batches an uninterrupted one would."""

from __future__ import annotations

import numpy as np
import torch

from poeem.data.interactions import InteractionData


class PairBatches:
    """Shuffled (query, item) batches of an :class:`InteractionData`, as tensors on ``device``,
    optionally with ``random_negatives`` uniformly sampled items (``negative_ids``) per batch."""

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
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-self.data.num_train // self.batch_size)

    def batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch``: ``query_ids`` (B,), ``item_ids`` (B,), and features."""
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = torch.from_numpy(rng.permutation(self.data.num_train))
            self._epoch = epoch
        rows = self._order[index * self.batch_size : (index + 1) * self.batch_size]
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
