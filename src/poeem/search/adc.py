"""Our own IVF-PQ (or IVF-RQ) search in torch: asymmetric distance computation (ADC) over learned
codes.

For users without FAISS, and for GPU search. It scores exactly as FAISS's IndexIVFPQ with
``by_residual`` does, so both return the same neighbours:

- inner product: <q, c_list> + sum_d <q_d, codeword_d>
- L2: ||q - c_list||^2 + ||r_hat||^2 + 2 <c_list, r_hat> - 2 sum_d <q_d, codeword_d>

where q is the rotated query and r_hat the PQ reconstruction of the item's residual (for RQ
codebooks, q_d is the whole query and r_hat the sum of the codewords). Items are
grouped by list once, and a query scans only the items of the ``nprobe`` lists it probes.
"""

from __future__ import annotations

import torch

from poeem.index.quantize import codeword_scores, pq_reconstruct
from poeem.index.tensors import IndexTensors
from poeem.metric import Metric, check_metric, check_search_args, prepare_queries, worst_score
from poeem.search.exact import chunk_rows


class TorchIVFPQ:
    """IVF-PQ search with probing of ``nprobe`` lists, in torch, on the tensors' device.

    Args:
        index: the learned index (validated here).
        metric: "ip", "cosine" or "l2".
    """

    def __init__(self, index: IndexTensors, metric: Metric = "ip") -> None:
        check_metric(metric)
        self.index, self.metric = index.validate(), metric
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
        step = chunk_rows(xq.shape[0], max(1, biggest_list))
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
        best_d = torch.full((nq, k), worst_score(self.metric), device=qr.device)
        best_i = torch.full((nq, k), -1, dtype=torch.long, device=qr.device)
        for lst in torch.unique(probes).tolist():
            a, b = self.offsets[lst], self.offsets[lst + 1]
            if a == b:
                continue
            rows = torch.nonzero((probes == lst).any(1)).flatten()  # queries probing this list
            codes, lut_rows = self.codes[a:b].long(), lut[:, rows]  # (n_l, D), (D, nq_l, K)
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
