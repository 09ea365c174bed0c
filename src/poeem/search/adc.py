"""Our own IVF-PQ search in torch: asymmetric distance computation (ADC) over learned codes.

For users without FAISS, and for GPU search. It scores exactly as FAISS's IndexIVFPQ with
``by_residual`` does, so both return the same neighbours:

- inner product: <q, c_list> + sum_d <q_d, codeword_d>
- L2: ||q - c_list||^2 + ||r_hat||^2 + 2 <c_list, r_hat> - 2 sum_d <q_d, codeword_d>

where q is the rotated query and r_hat the PQ reconstruction of the item's residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from poeem.errors import PoeemError
from poeem.index.quantize import pq_reconstruct, split_subvectors
from poeem.search.exact import chunk_rows
from poeem.search.metric import Metric, check_metric, prepare_queries, worst_score


@dataclass
class IndexTensors:
    """Everything an IVF-PQ index holds, as tensors (no FAISS objects).

    rotation: (dim, dim); the index codes x @ rotation.
    coarse: (coarse_K, dim) coarse centroids, or None (plain PQ).
    codebooks: (D, K, dsub).
    coarse_codes: (n,) int64 list of each item (zeros without IVF).
    codes: (n, D) int64 sub-codes.
    ids: (n,) int64 user ids of the items.
    """

    rotation: torch.Tensor
    coarse: torch.Tensor | None
    codebooks: torch.Tensor
    coarse_codes: torch.Tensor
    codes: torch.Tensor
    ids: torch.Tensor

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self.rotation.shape[0]

    @property
    def ntotal(self) -> int:
        """Number of items."""
        return self.codes.shape[0]

    @property
    def nlist(self) -> int:
        """Number of inverted lists (1 without IVF)."""
        return self.coarse.shape[0] if self.coarse is not None else 1


class TorchIVFPQ:
    """IVF-PQ search with probing of ``nprobe`` lists, in torch, on the tensors' device."""

    def __init__(self, index: IndexTensors, metric: Metric = "ip") -> None:
        check_metric(metric)
        self.index, self.metric = index, metric
        self._refresh()

    def _refresh(self) -> None:
        ix = self.index
        if self.metric == "l2":
            r_hat = pq_reconstruct(ix.codes, ix.codebooks)  # (n, dim)
            self.item_term = r_hat.pow(2).sum(-1)
            if ix.coarse is not None:
                self.item_term = self.item_term + 2 * (ix.coarse[ix.coarse_codes] * r_hat).sum(-1)

    @property
    def ntotal(self) -> int:
        """Number of items."""
        return self.index.ntotal

    def search(self, xq: torch.Tensor, k: int, nprobe: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items among the ``nprobe`` best lists of each query.

        Args:
            xq: (nq, dim) query embeddings (not rotated; normalised here for cosine).
            k: results per query; missing results have id -1.
            nprobe: lists probed per query, clamped to the number of lists.

        Returns:
            D: (nq, k) scores (similarities for ip/cosine, squared distances for l2);
            I: (nq, k) int64 item ids.
        """
        ix = self.index
        if k < 1 or nprobe < 1:
            raise PoeemError(
                "search", "k >= 1 and nprobe >= 1", f"k={k}, nprobe={nprobe}", "pass positive values"
            )
        xq = prepare_queries(xq, self.metric, ix.dim).to(ix.codebooks.device)
        nprobe = min(nprobe, ix.nlist)
        kk = min(k, ix.ntotal)
        out_d = torch.full((xq.shape[0], k), worst_score(self.metric), device=xq.device)
        out_i = torch.full((xq.shape[0], k), -1, dtype=torch.long, device=xq.device)
        if ix.ntotal == 0:
            return out_d, out_i
        step = chunk_rows(xq.shape[0], ix.ntotal)
        for start in range(0, xq.shape[0], step):
            d, i = self._search_chunk(xq[start : start + step] @ ix.rotation, kk, nprobe)
            out_d[start : start + step, :kk], out_i[start : start + step, :kk] = d, i
        return out_d, out_i

    def _search_chunk(self, qr: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
        ix, l2 = self.index, self.metric == "l2"
        lut = torch.bmm(
            split_subvectors(qr, ix.codebooks.shape[0]), ix.codebooks.transpose(1, 2)
        )  # (D, nq, K)
        pq_part = torch.zeros(qr.shape[0], ix.ntotal, device=qr.device)
        for d in range(lut.shape[0]):
            pq_part += lut[d][:, ix.codes[:, d]]  # (nq, n)
        if ix.coarse is None:
            coarse_part = (
                qr.pow(2).sum(-1, keepdim=True) if l2 else torch.zeros(qr.shape[0], 1, device=qr.device)
            )
            probed = torch.ones(qr.shape[0], ix.ntotal, dtype=torch.bool, device=qr.device)
        else:
            # (nq, coarse_K), higher is better: -squared distance for l2
            list_score = -torch.cdist(qr, ix.coarse).pow(2) if l2 else qr @ ix.coarse.T
            top_lists = list_score.topk(nprobe, dim=1).indices
            probed_list = torch.zeros_like(list_score, dtype=torch.bool).scatter_(1, top_lists, True)
            probed = probed_list[:, ix.coarse_codes]  # (nq, n)
            coarse_part = (-list_score if l2 else list_score)[:, ix.coarse_codes]
        if l2:
            score = coarse_part + self.item_term - 2 * pq_part
            score = score.masked_fill(~probed, float("inf"))
            d, i = score.topk(k, dim=1, largest=False)
        else:
            score = (coarse_part + pq_part).masked_fill(~probed, float("-inf"))
            d, i = score.topk(k, dim=1)
        missing = torch.isinf(d)
        return d, ix.ids[i].masked_fill(missing, -1)
