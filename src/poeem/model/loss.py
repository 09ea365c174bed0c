"""In-batch sampled softmax for two-tower retrieval, as a pure tensor function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax(
    scores: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each query against its own item, with the batch's items as negatives.

    Args:
        scores: (B, B) logits, row b = query b against every item of the batch.
        item_ids: (B,) item ids; an item equal to row b's positive elsewhere in the batch is
            masked out of row b's negatives.
        log_q: (B,) log sampling probability of each item for the logQ correction, or None.

    Returns:
        Scalar mean loss.
    """
    if log_q is not None:
        scores = scores - log_q.unsqueeze(0)
    duplicate = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)  # (B, B)
    duplicate.fill_diagonal_(False)
    scores = scores.masked_fill(duplicate, float("-inf"))
    target = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores, target)
