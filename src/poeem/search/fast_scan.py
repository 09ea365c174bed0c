"""FAISS's 4-bit fast-scan scoring in torch, for :class:`~poeem.search.adc.TorchIVFPQ` on an index
that FAISS serves as fast scan.

Fast scan does not add float look-up table entries. For each query it rounds its tables to 8
bits (and the list terms of an IVF index to 16 bits) with one scale ``a`` and one offset ``b``,
adds the integers in 16 bits, and returns ``b + total / a``. The scores here follow the same
steps in float32 (FAISS's ``quantize_lut``: the minimum of each table is its zero, the largest
span of a table becomes 255, sums run left to right):

- flat PQ: the query's table of each sub-vector (inner products, or squared L2 distances to the
  codewords), no list term;
- IVF, inner product: the same tables for every probed list, plus the list's score <q, c>;
- IVF, L2 (FAISS's precomputed tables): for each probed list c, ||r||^2 + 2 <c, r> - 2 <q, r>
  per codeword r, plus ||q - c||^2.

FAISS computes the float tables with its own kernels, whose last bits can differ from torch's;
an entry within a rounding error of a half step can then round the other way (one 8-bit step
in that query's scores).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# FAISS adds the 8-bit entries and the 16-bit list term in 16-bit integers, which wrap
ACCUMULATOR = 1 << 16


@dataclass(frozen=True)
class QuantizedTables:
    """One chunk of queries' rounded tables.

    lut: (nq, D, K) or, one table per probed list, (nq, P, D, K) integers in [0, 255].
    bias: (nq, P) integer list terms of the probed lists, or None (no lists).
    a: (nq,) float32 scale; b: (nq,) float32 offset: a score is ``b + total / a``.
    """

    lut: torch.Tensor
    bias: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor

    def scores(self, total: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Float32 scores of integer totals: (n_rows, n) ``total`` of the queries ``rows``.

        FAISS's ``total * (1 / a) + b`` is fused into one rounding (an FMA): the product is exact
        in float64, so float64 arithmetic rounded once to float32 gives the same value.
        """
        one_a = torch.where(self.a > 0, 1 / self.a, torch.zeros_like(self.a))[rows].double()
        return (total.double() * one_a[:, None] + self.b[rows].double()[:, None]).float()


def _left_to_right(start: torch.Tensor, terms: torch.Tensor) -> torch.Tensor:
    """``start + terms[..., 0] + terms[..., 1] + ...`` in float32, in that order (as FAISS adds)."""
    total = start.clone()
    for d in range(terms.shape[-1]):
        total = total + terms[..., d]
    return total


def _round(table: torch.Tensor, low: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """FAISS's ``floor((x - low) * a + 0.5)``, all float32; integers as int32."""
    return torch.floor((table - low) * a + 0.5).int()


def _scale(max_span: torch.Tensor, total_span: torch.Tensor | None) -> torch.Tensor:
    """``a``: the largest span of one table maps to 255, and (with list terms) the largest span
    of a whole score to 65535; 0 when there is no span at all."""
    a = torch.where(max_span > 0, 255 / max_span, torch.full_like(max_span, float("inf")))
    if total_span is not None:
        a = torch.minimum(
            a, torch.where(total_span > 0, 65535 / total_span, torch.full_like(a, float("inf")))
        )
    return torch.where(torch.isfinite(a), a, torch.zeros_like(a))


def quantize_flat(lut: torch.Tensor) -> QuantizedTables:
    """Tables of a flat index (FAISS's ``round_uint8_per_column``).

    Args:
        lut: (nq, D, K) float32 tables.
    """
    low = lut.amin(-1)  # (nq, D)
    span = lut.amax(-1) - low
    a = _scale(span.amax(-1), None)
    b = _left_to_right(torch.zeros_like(a), low)
    return QuantizedTables(_round(lut, low[..., None], a[:, None, None]), None, a, b)


def quantize_with_lists(lut: torch.Tensor, bias: torch.Tensor) -> QuantizedTables:
    """Tables of an IVF inner-product index: one table per query, and the list scores of its
    P probed lists (FAISS's ``quantize_LUT_and_bias``, 2-D tables).

    Args:
        lut: (nq, D, K) float32 tables; bias: (nq, P) float32 list terms.
    """
    low = lut.amin(-1)
    span = lut.amax(-1) - low
    bias_low = bias.amin(-1)
    a = _scale(span.amax(-1), _left_to_right(bias.amax(-1) - bias_low, span))
    b = _left_to_right(torch.zeros_like(a), low) + bias_low
    return QuantizedTables(
        _round(lut, low[..., None], a[:, None, None]), _round(bias, bias_low[:, None], a[:, None]), a, b
    )


def quantize_per_list(lut: torch.Tensor, bias: torch.Tensor) -> QuantizedTables:
    """Tables of an IVF L2 index: one table per probed list and its list term (FAISS's
    ``quantize_LUT_and_bias``, 3-D tables).

    Args:
        lut: (nq, P, D, K) float32 tables; bias: (nq, P) float32 list terms.
    """
    low = lut.amin(-1)  # (nq, P, D)
    span = lut.amax(-1) - low
    bias_low = bias.amin(-1, keepdim=True)
    list_low = _left_to_right(bias, low)  # (nq, P): the lowest score in each list
    a = _scale(span.flatten(1).amax(-1), _left_to_right(bias - bias_low, span).amax(-1))
    b = list_low.amin(-1)
    lutq = _round(lut, low[..., None], a[:, None, None, None])
    return QuantizedTables(lutq, _round(list_low, b[:, None], a[:, None]), a, b)
