"""In-batch sampled softmax for two-tower retrieval, as a pure tensor function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax(
    scores: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of each query against its own item, with the other items as negatives.

    Args:
        scores: (B, M) logits, M >= B: row b = query b against the batch's B positive items
            (column b is its own) followed by M - B extra negatives (e.g. uniform samples).
        item_ids: (M,) item id of each column; a column holding row b's positive item (other
            than column b) is masked out of row b's negatives.
        log_q: (M,) log sampling probability of each column's item for the logQ correction,
            or None.

    Returns:
        Scalar mean loss.
    """
    if log_q is not None:
        scores = scores - log_q.unsqueeze(0)
    b = scores.shape[0]
    target = torch.arange(b, device=scores.device)
    duplicate = item_ids.unsqueeze(0) == item_ids[:b].unsqueeze(1)  # (B, M)
    duplicate[target, target] = False
    scores = scores.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(scores, target)
