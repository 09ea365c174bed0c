"""Our own IVF-PQ (or IVF-RQ) search in torch: asymmetric distance computation (ADC) over learned
codes.

For users without FAISS, and for GPU search. It scores as FAISS's IndexIVFPQ with
``by_residual`` does:

- inner product: <q, c_list> + sum_d <q_d, codeword_d>
- L2: ||q - c_list||^2 + ||r_hat||^2 + 2 <c_list, r_hat> - 2 sum_d <q_d, codeword_d>

where q is the rotated query and r_hat the PQ reconstruction of the item's residual (for RQ
codebooks, q_d is the whole query and r_hat the sum of the codewords). With ``fast_scan`` it
scores as FAISS's 4-bit fast scan does instead, each query's look-up tables rounded to 8 bits
(:mod:`poeem.search.fast_scan`). Items are grouped by list once, and a query scans only the
items of the ``nprobe`` lists it probes.

Both backends return the same scores, up to float rounding (FAISS's kernels add in another
order; in fast scan such a difference can move one table entry by one 8-bit step). Items tied
at the k-th score may come back in another order or be another of the tied items: FAISS keeps
the ones its scan meets first, torch those ``torch.topk`` picks.
"""

from __future__ import annotations

import torch

from poeem.errors import PoeemError
from poeem.index.quantize import codeword_scores, is_residual, pq_reconstruct, split_subvectors
from poeem.index.tensors import IndexTensors
from poeem.metric import Metric, check_metric, check_search_args, prepare_queries, worst_score
from poeem.search.exact import chunk_rows
from poeem.search.fast_scan import (
    ACCUMULATOR,
    QuantizedTables,
    quantize_flat,
    quantize_per_list,
    quantize_with_lists,
)


class TorchIVFPQ:
    """IVF-PQ search with probing of ``nprobe`` lists, in torch, on the tensors' device.

    Args:
        index: the learned index (validated here).
        metric: "ip", "cosine" or "l2".
        fast_scan: score as FAISS's 4-bit fast scan (PQ codes with K = 16), the way an index
            directory with fast scan is served.
    """

    def __init__(self, index: IndexTensors, metric: Metric = "ip", fast_scan: bool = False) -> None:
        check_metric(metric)
        self.index, self.metric, self.fast_scan = index.validate(), metric, fast_scan
        if fast_scan and (is_residual(index.codebooks, index.dim) or index.codebooks.shape[1] != 16):
            raise PoeemError(
                "fast_scan",
                "PQ codes with K = 16",
                f"{tuple(index.codebooks.shape)} codebooks",
                "pass fast_scan=False",
            )
        order = torch.argsort(index.coarse_codes, stable=True)
        self.codes, self.ids = index.codes[order], index.ids[order]  # grouped by list
        sizes = torch.bincount(index.coarse_codes.long(), minlength=index.nlist)
        self.offsets = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)]).tolist()  # (nlist + 1,)
        self.item_term: torch.Tensor | None = None
        if metric == "l2":  # ||r_hat||^2 + 2 <c, r_hat>, per item
            r_hat = pq_reconstruct(self.codes, index.codebooks, index.dim)
            self.item_term = r_hat.pow(2).sum(-1)
            if index.coarse is not None:
                self.item_term += 2 * (index.coarse[index.coarse_codes[order].long()] * r_hat).sum(-1)
        self.list_tables: torch.Tensor | None = None
        if fast_scan and metric == "l2" and index.coarse is not None:
            # FAISS's precomputed tables: ||r||^2 + 2 <c_d, r> per list c, sub-vector d, codeword r
            per_list = torch.einsum(
                "dlx,dkx->ldk", split_subvectors(index.coarse, index.codebooks.shape[0]), index.codebooks
            )
            self.list_tables = index.codebooks.pow(2).sum(-1) + 2 * per_list  # (nlist, D, K)

    @property
    def ntotal(self) -> int:
        """Number of items."""
        return self.index.ntotal

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items among the ``nprobe`` best lists of each query.

        Args:
            xq: (nq, dim) finite query embeddings (not rotated; normalised here for cosine).
            k: results per query; missing results have id -1.
            nprobe: lists probed per query, clamped to the number of lists.

        Returns:
            D: (nq, k) scores (similarities for ip/cosine, squared distances for l2);
            I: (nq, k) int64 item ids.
        """
        check_search_args(k, nprobe)
        ix = self.index
        xq = prepare_queries(xq, self.metric, ix.dim).to(ix.codebooks.device)
        nprobe = min(nprobe, ix.nlist)
        largest = self.metric != "l2"
        out_d = torch.full((xq.shape[0], k), worst_score(self.metric), device=xq.device)
        out_i = torch.full((xq.shape[0], k), -1, dtype=torch.long, device=xq.device)
        biggest_list = max(b - a for a, b in zip(self.offsets[:-1], self.offsets[1:], strict=True))
        per_query = biggest_list
        if self.list_tables is not None:  # one table per probed list
            per_query = max(per_query, nprobe * self.list_tables[0].numel())
        step = chunk_rows(xq.shape[0], max(1, per_query))
        for start in range(0, xq.shape[0], step):
            sl = slice(start, start + step)
            out_d[sl], out_i[sl] = self._search_chunk(xq[sl] @ ix.rotation, k, nprobe, largest)
        return out_d, out_i

    def _search_chunk(
        self, qr: torch.Tensor, k: int, nprobe: int, largest: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ix, nq = self.index, qr.shape[0]
        lut = codeword_scores(qr, ix.codebooks)
        if ix.coarse is None:
            list_score = torch.zeros(nq, 1, device=qr.device)
            probes = torch.zeros(nq, 1, dtype=torch.long, device=qr.device)
        else:
            # (nq, nlist); higher is better: the inner product, or minus the squared distance
            list_score = qr @ ix.coarse.T if largest else -torch.cdist(qr, ix.coarse).pow(2)
            probes = list_score.topk(nprobe, dim=1).indices
        if not largest and ix.coarse is None:
            list_score = -qr.pow(2).sum(-1, keepdim=True)  # ||q||^2 is the flat "coarse" part
        tables = self._fast_scan_tables(qr, lut, list_score, probes) if self.fast_scan else None
        best_d = torch.full((nq, k), worst_score(self.metric), device=qr.device)
        best_i = torch.full((nq, k), -1, dtype=torch.long, device=qr.device)
        for lst in torch.unique(probes).tolist():
            a, b = self.offsets[lst], self.offsets[lst + 1]
            if a == b:
                continue
            hit = probes == lst
            rows = torch.nonzero(hit.any(1)).flatten()  # queries probing this list
            codes = self.codes[a:b].long()  # (n_l, D)
            if tables is not None:
                score = self._fast_scan_scores(tables, rows, hit[rows].int().argmax(1), codes, largest)
            else:
                lut_rows = lut[:, rows]  # (D, nq_l, K)
                pq = lut_rows[0][:, codes[:, 0]]  # (nq_l, n_l)
                for d in range(1, codes.shape[1]):
                    pq += lut_rows[d][:, codes[:, d]]
                coarse = list_score[rows, lst].unsqueeze(1)
                if largest:
                    score = coarse + pq
                else:
                    assert self.item_term is not None
                    score = -coarse + self.item_term[a:b] - 2 * pq
            merged_d = torch.cat([best_d[rows], score], 1)
            merged_i = torch.cat([best_i[rows], self.ids[a:b].expand(len(rows), -1)], 1)
            d, pos = merged_d.topk(k, dim=1, largest=largest)
            best_d[rows], best_i[rows] = d, merged_i.gather(1, pos)
        best_i[torch.isinf(best_d)] = -1
        return best_d, best_i

    def _fast_scan_tables(
        self, qr: torch.Tensor, lut: torch.Tensor, list_score: torch.Tensor, probes: torch.Tensor
    ) -> QuantizedTables:
        """The chunk's 8-bit tables, as FAISS fast scan rounds them (:mod:`poeem.search.fast_scan`).

        Args:
            qr: (nq, dim) rotated queries; lut: (D, nq, K) inner-product tables;
            list_score: (nq, nlist) list scores; probes: (nq, P) probed lists.
        """
        ix, lut = self.index, lut.transpose(0, 1)  # (nq, D, K)
        if ix.coarse is None:
            if self.metric != "l2":
                return quantize_flat(lut)
            sub = split_subvectors(qr, ix.codebooks.shape[0]).transpose(0, 1)  # (nq, D, dsub)
            return quantize_flat((sub[:, :, None, :] - ix.codebooks[None]).pow(2).sum(-1))
        if self.metric != "l2":
            return quantize_with_lists(lut, list_score.gather(1, probes))
        assert self.list_tables is not None
        distance = (qr[:, None, :] - ix.coarse[probes]).pow(2).sum(-1)  # (nq, P): ||q - c||^2
        return quantize_per_list(self.list_tables[probes] - 2 * lut[:, None], distance)

    def _fast_scan_scores(
        self,
        tables: QuantizedTables,
        rows: torch.Tensor,
        probe: torch.Tensor,
        codes: torch.Tensor,
        largest: bool,
    ) -> torch.Tensor:
        """(nq_l, n_l) fast-scan scores of one list's items for the queries ``rows``, which probe
        it as their ``probe``-th list; FAISS never returns a total of 0 (inner product) or 65535
        (L2), which it takes for the starting threshold, so neither is scored here."""
        lut = tables.lut[rows] if tables.lut.dim() == 3 else tables.lut[rows, probe]  # (nq_l, D, K)
        total = lut[:, 0][:, codes[:, 0]]
        for d in range(1, codes.shape[1]):
            total += lut[:, d][:, codes[:, d]]
        if tables.bias is not None:
            total += tables.bias[rows, probe][:, None]
        total %= ACCUMULATOR
        score = tables.scores(total, rows)
        never = total == (0 if largest else ACCUMULATOR - 1)
        return torch.where(never, torch.full_like(score, worst_score(self.metric)), score)
