"""In-batch sampled softmax for two-tower retrieval, fused into one autograd function.

The (B, M) score matrix is the only large tensor of a two-tower step. Written with plain ops
(matmul, scale, logQ shift, duplicate mask, cross-entropy) the loss makes about 14 passes over
it and keeps copies of it alive for backward. Here it is computed in row blocks small enough
to stay in cache: the matmul writes a block with the logQ shift added, duplicates are masked
in place from a sparse list of pairs, and the block becomes its softmax in place, kept for
backward (or, past ``KEEP_BYTES``, computed again there, so that a large batch never holds the
whole matrix). About half the time of the plain ops on a CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from poeem.errors import PoeemError


def in_batch_softmax(
    queries: torch.Tensor,
    items: torch.Tensor,
    item_ids: torch.Tensor,
    log_q: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Cross-entropy of each query against its own item, with the other items as negatives.

    Args:
        queries: (B, dim) query embeddings, already divided by the softmax temperature.
        items: (M, dim) item embeddings, M >= offset + B: the positive items (row b's own in
            row ``offset + b``), then any extra negatives (e.g. uniform samples).
        item_ids: (M,) item id of each row of ``items``; a column holding query b's positive
            item (other than its own column) is masked out of b's negatives.
        log_q: (M,) log sampling probability of each column's item for the logQ correction
            (subtracted from the scores), or None.
        offset: column of query 0's positive: this rank's start among positives gathered from
            all ranks (0 in a single process).

    Returns:
        Scalar mean loss; gradients flow to ``queries`` and ``items``.
    """
    b, m = queries.shape[0], items.shape[0]
    if item_ids.shape != (m,) or not 0 <= offset <= m - b:
        raise PoeemError(
            "in_batch_softmax",
            f"{m} item ids, positives in columns offset .. offset + {b} <= {m}",
            f"ids of shape {tuple(item_ids.shape)}, offset {offset}",
            "pass one id per item row, positives first",
        )
    bias = -log_q if log_q is not None else items.new_zeros(m)
    rows, cols = _duplicate_pairs(item_ids, b, offset)
    return _FusedInBatchSoftmax.apply(queries, items, bias, rows, cols, offset)


def _duplicate_pairs(item_ids: torch.Tensor, b: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every column other than row b's own that holds row b's positive item;
    found by sorting the M ids, so it costs O(M log M), never a (B, M) comparison."""
    sorted_ids, order = item_ids.sort()
    positives = item_ids[offset : offset + b]
    lo = torch.searchsorted(sorted_ids, positives)
    counts = torch.searchsorted(sorted_ids, positives, right=True) - lo  # >= 1: the own column
    rows = torch.repeat_interleave(torch.arange(b, device=item_ids.device), counts)
    first = torch.repeat_interleave(lo, counts)
    within = torch.arange(rows.numel(), device=item_ids.device) - torch.repeat_interleave(
        counts.cumsum(0) - counts, counts
    )
    cols = order[first + within]
    other = cols != rows + offset
    return rows[other], cols[other]


BLOCK_BYTES = {"cpu": 1 << 21}  # scores per row block: in cache on the CPU
DEFAULT_BLOCK_BYTES = 1 << 28  # accelerators: big kernels pay
KEEP_BYTES = 1 << 28  # softmax blocks up to this size in all are kept for backward, not recomputed


def _row_blocks(b: int, m: int, device: torch.device) -> range:
    """Starts of the row blocks that the (B, M) scores are computed in."""
    budget = BLOCK_BYTES.get(device.type, DEFAULT_BLOCK_BYTES)
    return range(0, b, max(1, budget // (4 * max(m, 1))))  # float32 scores


class _FusedInBatchSoftmax(torch.autograd.Function):
    """Forward: per row block, scores = q @ x.T + bias, masked, -> softmax and logsumexp;
    loss = mean(logsumexp - own score). Backward: gradient (softmax - one-hot) / B, multiplied
    back through the two factors. The softmax blocks are kept for backward while they fit in
    ``KEEP_BYTES``; beyond it only the (B,) logsumexp is, and backward computes each block
    again, so no (B, M) tensor is ever whole in memory."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        queries: torch.Tensor,
        items: torch.Tensor,
        bias: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        offset: int,
    ) -> torch.Tensor:
        b, m = queries.shape[0], items.shape[0]
        lse = queries.new_empty(b)
        kept: list[torch.Tensor] | None = [] if b * m * queries.element_size() <= KEEP_BYTES else None
        for lo, scores in _blocks(queries, items, bias, rows, cols):
            top = scores.amax(dim=1, keepdim=True)  # a softmax in place: the block is ours
            total = scores.sub_(top).exp_().sum(dim=1, keepdim=True)
            lse[lo : lo + scores.shape[0]] = (total.log() + top).squeeze(1)
            if kept is not None:
                kept.append(scores.div_(total))
        own = (queries * items[offset : offset + b]).sum(1) + bias[offset : offset + b]
        ctx.save_for_backward(queries, items, bias, rows, cols, lse)
        ctx.offset, ctx.kept = offset, kept
        return (lse - own).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        queries, items, bias, rows, cols, lse = ctx.saved_tensors
        b, offset, kept = queries.shape[0], ctx.offset, ctx.kept
        want_q, want_x, want_bias = ctx.needs_input_grad[:3]
        if kept is not None:
            starts = _row_blocks(b, items.shape[0], queries.device)
            blocks: Iterator[tuple[int, torch.Tensor]] = zip(starts, kept, strict=True)
        else:  # computed again, and turned into the softmax in place
            blocks = (
                (lo, s.sub_(lse[lo : lo + s.shape[0], None]).exp_())
                for lo, s in _blocks(queries, items, bias, rows, cols)
            )
        grad_q = torch.empty_like(queries)
        grad_x = torch.zeros_like(items)
        grad_bias = torch.zeros_like(bias)
        for lo, probs in blocks:
            hi = lo + probs.shape[0]
            if want_q:
                torch.mm(probs, items, out=grad_q[lo:hi])
            if want_x:
                grad_x.addmm_(probs.T, queries[lo:hi])
            if want_bias:
                grad_bias += probs.sum(0)
        # the one-hot part of (softmax - one-hot): each query's own item
        grad_q -= items[offset : offset + b]
        grad_x[offset : offset + b] -= queries
        grad_bias[offset : offset + b] -= 1.0
        scale = grad / b
        ctx.kept = None
        return (
            grad_q * scale if want_q else None,
            grad_x * scale if want_x else None,
            grad_bias * scale if want_bias else None,
            None,
            None,
            None,
        )


def _blocks(
    queries: torch.Tensor, items: torch.Tensor, bias: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> Iterator[tuple[int, torch.Tensor]]:
    """(start row, masked (rows, M) scores) of each row block; ``rows`` is sorted."""
    b, m = queries.shape[0], items.shape[0]
    starts = _row_blocks(b, m, queries.device)
    bounds = torch.searchsorted(rows, torch.tensor([*starts, b], device=rows.device)).tolist()
    for i, lo in enumerate(starts):
        hi = min(lo + starts.step, b)
        scores = torch.addmm(bias.unsqueeze(0), queries[lo:hi], items.T)
        seg = slice(bounds[i], bounds[i + 1])
        scores[rows[seg] - lo, cols[seg]] = float("-inf")
        yield lo, scores
