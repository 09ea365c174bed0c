"""In-batch sampled softmax for two-tower retrieval, as a pure tensor function."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def in_batch_softmax(
    scores: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Cross-entropy of each query against its own item, with the other items as negatives.

    Args:
        scores: (B, M) logits, M >= offset + B: row b = query b against the positive items,
            its own in column ``offset + b``, then any extra negatives (e.g. uniform samples).
        item_ids: (M,) item id of each column; a column holding row b's positive item (other
            than its own column) is masked out of row b's negatives.
        log_q: (M,) log sampling probability of each column's item for the logQ correction,
            or None.
        offset: column of row 0's positive: this rank's start among positives gathered from
            all ranks (0 in a single process).

    Returns:
        Scalar mean loss.
    """
    if log_q is not None:
        scores = scores - log_q.unsqueeze(0)
    b = scores.shape[0]
    rows = torch.arange(b, device=scores.device)
    target = rows + offset
    duplicate = item_ids.unsqueeze(0) == item_ids[offset : offset + b].unsqueeze(1)  # (B, M)
    duplicate[rows, target] = False
    scores = scores.masked_fill(duplicate, float("-inf"))
    return F.cross_entropy(scores, target)
