"""Pure tensor functions of IVF + PQ (or RQ) quantization, in the paper's notation.

A vector x (dim,) in the rotated space is coded as a coarse code c in [0, coarse_K) and D
sub-codes in [0, K). Product quantization (PQ, codebooks (D, K, dim / D)): x ~ coarse[c] +
concat_d codebooks[d, code_d]. Residual quantization (RQ, codebooks (D, K, dim)): x ~ coarse[c]
+ sum_d codebooks[d, code_d], stage d coding what the stages before it left. The codebooks'
shape tells which (:func:`is_residual`); with D = 1 both are the same.

Bulk encoding (``bulk=True``: exports, ``Searcher.add``) of float32 vectors on the CPU runs on
FAISS's flat search and PQ encoder: exact like the torch path, and faster (most of all for the
sub-codes), which is most of an export's time. A training step's PQ sub-codes (K <= 256) use
FAISS's encoder too, on one FAISS thread: faster than torch's distances and ``min`` on a
batch the more codewords there are (measured on one core: 4.6x at K = 256, 2.6-2.8x at K = 64,
1.0-1.6x at K = 16), and no FAISS thread pool competes with torch's (a pool started before training slowed
training steps; docs/experiments/). List assignment in training stays in torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import faiss
import numpy as np
import torch

from poeem.errors import PoeemError
from poeem.index.kmeans import kmeans, nearest_centroid


def smallest_uint_dtype(n: int) -> torch.dtype:
    """The smallest integer dtype that holds the values 0..n-1."""
    if n <= 1 << 8:
        return torch.uint8
    if n <= 1 << 16:
        return torch.uint16
    return torch.int32


def coarse_assign(
    xr: torch.Tensor, coarse: torch.Tensor, coarse_metric: str = "l2", bulk: bool = False
) -> torch.Tensor:
    """The coarse centroid (list) of each vector.

    Args:
        xr: (B, dim) rotated vectors.
        coarse: (coarse_K, dim) centroids, coarse_K >= 1.
        coarse_metric: "l2" (nearest centroid) or "ip" (largest inner product, the rule an
            inner-product IVF index probes lists with).
        bulk: a gradient-free encoding of many vectors (FAISS on the CPU, see above).

    Returns:
        (B,) int64 coarse codes.
    """
    if bulk and _faiss_can_assign(xr, coarse):
        flat = (faiss.IndexFlatIP if coarse_metric == "ip" else faiss.IndexFlatL2)(coarse.shape[1])
        flat.add(_numpy(coarse))
        _, labels = flat.search(_numpy(xr), 1)
        if (labels < 0).any():  # FAISS's answer for NaN scores
            finite = bool(torch.isfinite(xr).all())
            raise PoeemError(
                "vectors to assign to lists",
                "finite scores against the centroids",
                "scores past float32 (vectors or centroids too long)" if finite else "NaN or inf vectors",
                "scale the vectors down" if finite else "check the inputs",
            )
        return torch.from_numpy(labels[:, 0])
    codes, _ = nearest_centroid(xr.unsqueeze(0), coarse.unsqueeze(0), inner_product=coarse_metric == "ip")
    return codes[0]


@contextmanager
def one_faiss_thread() -> Iterator[None]:
    """Run FAISS calls inside on the calling thread only (no OpenMP pool), then restore its
    thread count."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _faiss_can_assign(x: torch.Tensor, centroids: torch.Tensor) -> bool:
    """Whether FAISS can assign the (B, dim) vectors ``x``: float32 on the CPU, and not empty."""
    return x.shape[0] > 0 and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, centroids))


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def split_subvectors(x: torch.Tensor, num_subspaces: int) -> torch.Tensor:
    """(B, dim) -> (D, B, dsub): the subvectors of each subspace grouped together."""
    return x.reshape(x.shape[0], num_subspaces, -1).transpose(0, 1)


def is_residual(codebooks: torch.Tensor, dim: int) -> bool:
    """Whether (D, K, w) ``codebooks`` of vectors of size ``dim`` are a residual quantizer's
    (w = dim, D > 1) rather than product quantization's (w = dim / D)."""
    return codebooks.shape[0] > 1 and codebooks.shape[2] == dim


def pq_assign(residual: torch.Tensor, codebooks: torch.Tensor, bulk: bool = False) -> torch.Tensor:
    """Sub-codes of each vector: the nearest codeword (L2) of each subvector for PQ codebooks;
    for RQ codebooks, greedily stage by stage (:func:`rq_assign`).

    Args:
        residual: (B, dim) vectors to code (residuals of the coarse quantizer).
        codebooks: (D, K, dsub) PQ or (D, K, dim) RQ codewords.
        bulk: see :func:`coarse_assign`.

    Returns:
        (B, D) int64 sub-codes.
    """
    if is_residual(codebooks, residual.shape[1]):
        return rq_assign(residual, codebooks)
    d, k, dsub = codebooks.shape
    if (bulk or k <= 256) and _faiss_can_assign(residual, codebooks) and k & (k - 1) == 0:
        nbits = k.bit_length() - 1
        pq = faiss.ProductQuantizer(d * dsub, d, nbits)
        faiss.copy_array_to_vector(_numpy(codebooks).ravel(), pq.centroids)
        with nullcontext() if bulk else one_faiss_thread():
            packed = pq.compute_codes(_numpy(residual))
        return torch.from_numpy(packed if nbits == 8 else faiss.unpack_bitstrings(packed, d, nbits)).long()
    codes, _ = nearest_centroid(split_subvectors(residual, codebooks.shape[0]), codebooks)
    return codes.T


def rq_assign(residual: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Greedy residual coding: stage d takes the codeword nearest (L2) to what the stages
    before it left of each vector.

    Args:
        residual: (B, dim) vectors to code.
        codebooks: (D, K, dim) codewords.

    Returns:
        (B, D) int64 sub-codes.
    """
    left = residual.clone()
    codes = torch.empty(residual.shape[0], codebooks.shape[0], dtype=torch.long, device=residual.device)
    for stage in range(codebooks.shape[0]):
        best, _ = nearest_centroid(left.unsqueeze(0), codebooks[stage].unsqueeze(0))
        codes[:, stage] = best[0]
        left -= codebooks[stage, best[0]]
    return codes


def pq_reconstruct(codes: torch.Tensor, codebooks: torch.Tensor, dim: int) -> torch.Tensor:
    """Codewords of the given sub-codes, concatenated (PQ) or summed (RQ); differentiable in
    ``codebooks``.

    Args:
        codes: (B, D) integer sub-codes.
        codebooks: (D, K, dsub) PQ or (D, K, dim) RQ codewords.
        dim: the size of the vectors coded.

    Returns:
        (B, dim) reconstructions.
    """
    subspace = torch.arange(codebooks.shape[0], device=codebooks.device)
    words = codebooks[subspace, codes.long()]  # (B, D, width)
    return words.sum(1) if is_residual(codebooks, dim) else words.reshape(codes.shape[0], -1)


def codeword_scores(qr: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Look-up tables of asymmetric scoring: <q_d, codebooks[d, k]> for PQ (q_d: the query's
    d-th subvector), <q, codebooks[d, k]> for RQ; the inner product of a query with a code's
    reconstruction is the sum over d of its entries.

    Args:
        qr: (nq, dim) rotated queries.
        codebooks: (D, K, dsub) or (D, K, dim).

    Returns:
        (D, nq, K) scores.
    """
    if is_residual(codebooks, qr.shape[1]):
        return torch.einsum("qe,dke->dqk", qr, codebooks)
    return torch.bmm(split_subvectors(qr, codebooks.shape[0]), codebooks.transpose(1, 2))


def stage_inputs(residual: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """What each codebook codes, per vector: (D, B, dsub) subvectors for PQ; for RQ, (D, B, dim)
    what the stages before d left of each (B, dim) ``residual`` with its (B, D) ``codes``."""
    if not is_residual(codebooks, residual.shape[1]):
        return split_subvectors(residual, codebooks.shape[0])
    words = codebooks[torch.arange(codebooks.shape[0], device=codebooks.device), codes.long()]  # (B, D, dim)
    before = torch.cumsum(words, 1) - words  # sum of the stages before d
    return (residual.unsqueeze(1) - before).transpose(0, 1)


def encode_rotated(
    xr: torch.Tensor,
    coarse: torch.Tensor | None,
    codebooks: torch.Tensor,
    coarse_metric: str = "l2",
    bulk: bool = False,
    lists: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Coarse codes and sub-codes of rotated vectors.

    Args:
        xr: (B, dim) rotated vectors.
        coarse: (coarse_K, dim) coarse centroids, or None without a coarse quantizer.
        codebooks: (D, K, dsub) codewords.
        coarse_metric: the list assignment rule, see :func:`coarse_assign`.
        bulk: see :func:`coarse_assign`.
        lists: (B,) coarse codes to keep instead of assigning them (only the residuals'
            sub-codes are computed), or None.

    Returns:
        coarse_codes: (B,) int64, or None; codes: (B, D) int64.
    """
    if coarse is None:
        return None, pq_assign(xr, codebooks, bulk)
    coarse_codes = coarse_assign(xr, coarse, coarse_metric, bulk) if lists is None else lists.long()
    return coarse_codes, pq_assign(xr - coarse[coarse_codes], codebooks, bulk)


def decode_rotated(
    coarse_codes: torch.Tensor | None,
    codes: torch.Tensor,
    coarse: torch.Tensor | None,
    codebooks: torch.Tensor,
    dim: int,
) -> torch.Tensor:
    """Reconstruction in the rotated space: coarse[c] + PQ (or RQ) codewords; (B, dim)."""
    recon = pq_reconstruct(codes, codebooks, dim)
    if coarse is not None and coarse_codes is not None:
        recon = recon + coarse[coarse_codes.long()]
    return recon


def fit_ivf_pq(
    xr: torch.Tensor,
    num_coarse: int,
    num_subspaces: int,
    codebook_size: int,
    iters: int,
    seed: int,
    progress: bool = False,
    coarse_metric: str = "l2",
    coarse_fit: str = "auto",
    quantizer: str = "pq",
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """k-means of the coarse centroids, then of the PQ (or RQ) codebooks on the **residuals**.

    Args:
        xr: (n, dim) rotated training vectors.
        coarse_metric: the list rule (see :func:`coarse_assign`).
        coarse_fit: how the centroids are fitted: "kmeans" (L2 k-means), "equal_norm"
            (:func:`inner_product_centroids`), or "auto": equal_norm for the "ip" rule when the
            norms of ``xr`` vary by more than 1% (relative std), else kmeans.
        quantizer: "pq" (k-means of each subspace) or "rq" (:func:`fit_residual_codebooks`).

    Returns:
        coarse: (coarse_K, dim) or None when num_coarse is 0; codebooks: (D, K, dsub) for PQ,
        (D, K, dim) for RQ.
    """
    coarse = None
    residual = xr
    if num_coarse > 0:
        if resolve_coarse_fit(xr, coarse_metric, coarse_fit) == "equal_norm":
            coarse = inner_product_centroids(xr, num_coarse, iters, seed, progress)
        else:
            coarse = kmeans(xr, num_coarse, iters=iters, seed=seed, progress=progress)
        residual = xr - coarse[coarse_assign(xr, coarse, coarse_metric)]
    return coarse, fit_residual_coder(
        residual, quantizer, num_subspaces, codebook_size, iters, seed + 1, progress
    )


def fit_residual_coder(
    residual: torch.Tensor,
    quantizer: str,
    num_subspaces: int,
    codebook_size: int,
    iters: int,
    seed: int,
    progress: bool = False,
) -> torch.Tensor:
    """Codebooks for ``residual`` (n, dim), the vectors minus their lists' centroids: a k-means
    of each subspace ("pq"), or :func:`fit_residual_codebooks` ("rq").

    Returns:
        (D, K, dim / D) for PQ, (D, K, dim) for RQ.
    """
    if quantizer == "rq":
        return fit_residual_codebooks(residual, num_subspaces, codebook_size, iters, seed)
    sub = split_subvectors(residual, num_subspaces)  # (D, n, dsub)
    return kmeans(sub, codebook_size, iters=iters, seed=seed, progress=progress)


def fit_residual_codebooks(
    residual: torch.Tensor, stages: int, codebook_size: int, iters: int, seed: int
) -> torch.Tensor:
    """Residual quantizer codebooks for the greedy coding of :func:`rq_assign`, trained by
    FAISS's ``ResidualQuantizer``: each stage a k-means of what the stages before it left, grown
    over progressively more principal dimensions (beam 1, so training codes like the layer).

    Plain k-means of each stage in full dimension memorises points when they are few per
    codeword (5k 384-d text embeddings, 16 x 256 codewords): its codewords then reconstruct
    some items exactly and the rest poorly, and rank far worse (docs/experiments/).

    Args:
        residual: (n, dim) vectors to code, n >= codebook_size.
        stages: D, the number of codebooks.
        codebook_size: K, a power of two.
        iters: k-means iterations per growth step.
        seed: seeds FAISS's k-means.

    Returns:
        (stages, K, dim) float32 codebooks on ``residual``'s device.
    """
    dim = residual.shape[1]
    quantizer = faiss.ResidualQuantizer(dim, stages, codebook_size.bit_length() - 1)
    quantizer.train_type = faiss.ResidualQuantizer.Train_progressive_dim
    quantizer.max_beam_size = 1
    quantizer.cp.niter, quantizer.cp.seed = iters, seed
    quantizer.cp.min_points_per_centroid = 1  # few points per codeword is the case at hand, not a warning
    quantizer.train(np.ascontiguousarray(residual.detach().float().cpu().numpy()))
    books = faiss.vector_float_to_array(quantizer.codebooks).reshape(stages, codebook_size, dim)
    return torch.from_numpy(books.copy()).to(residual.device)


def resolve_coarse_fit(x: torch.Tensor, coarse_metric: str, coarse_fit: str) -> str:
    """Which fit, "kmeans" or "equal_norm", ``coarse_fit`` stands for on vectors ``x`` (n, dim).

    "auto" picks equal_norm only for the inner-product rule on vectors whose norms vary (relative
    std above 1%): there, L2 k-means centroids of unequal norms empty lists. On normalised
    vectors (cosine models) L2 k-means fits better (measured on Gowalla, docs/design.md).
    """
    if coarse_fit != "auto":
        return coarse_fit
    if coarse_metric != "ip":
        return "kmeans"
    norms = x.norm(dim=1)
    return "equal_norm" if float(norms.std() / norms.mean().clamp_min(1e-12)) > 0.01 else "kmeans"


def inner_product_centroids(
    x: torch.Tensor, num_coarse: int, iters: int, seed: int, progress: bool = False
) -> torch.Tensor:
    """Coarse centroids fitted for the inner-product list rule.

    L2 k-means centroids have unequal norms, and under the inner-product rule the long ones
    take most items (lists empty out, residuals grow). Here all centroids share one norm:
    directions u from spherical k-means, scaled by the s that minimises the residual energy
    sum_i ||x_i - s u_a(i)||^2, which is s = mean_i <x_i, u_a(i)>. With equal norms the
    inner-product and the L2 rules pick the same list.

    Args:
        x: (n, dim) rotated vectors.

    Returns:
        (num_coarse, dim) centroids.
    """
    directions = kmeans(x, num_coarse, iters=iters, seed=seed, progress=progress, spherical=True)
    best, _ = nearest_centroid(x.unsqueeze(0), directions.unsqueeze(0), inner_product=True)
    scale = (x * directions[best[0]]).sum(-1).mean().clamp_min(1e-12)
    return directions * scale


def procrustes_rotation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The orthogonal R minimising ||x R - y||_F (the OPQ rotation update).

    Args:
        x: (n, dim) vectors; y: (n, dim) their targets.

    Returns:
        (dim, dim) orthogonal matrix.
    """
    u, _, vh = torch.linalg.svd(x.double().T @ y.double())
    return (u @ vh).float()


def fit_opq(
    x: torch.Tensor,
    num_coarse: int,
    num_subspaces: int,
    codebook_size: int,
    iters: int,
    rounds: int,
    seed: int,
    progress: bool = False,
    coarse_metric: str = "l2",
    coarse_fit: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """OPQ alternation: fit IVF-PQ on x R, then update R by Procrustes; repeat ``rounds`` times.

    Args:
        x: (n, dim) training vectors (not rotated).

    Returns:
        rotation: (dim, dim) orthogonal; coarse: (coarse_K, dim) or None; codebooks (D, K, dsub).
    """
    rotation = torch.eye(x.shape[1], device=x.device)
    for r in range(rounds):
        xr = x @ rotation
        coarse, codebooks = fit_ivf_pq(
            xr,
            num_coarse,
            num_subspaces,
            codebook_size,
            max(1, iters // 2),
            seed + 10 * r,
            coarse_metric=coarse_metric,
            coarse_fit=coarse_fit,
        )
        recon = decode_rotated(
            *encode_rotated(xr, coarse, codebooks, coarse_metric), coarse, codebooks, x.shape[1]
        )
        rotation = procrustes_rotation(x, recon)
    coarse, codebooks = fit_ivf_pq(
        x @ rotation,
        num_coarse,
        num_subspaces,
        codebook_size,
        iters,
        seed,
        progress,
        coarse_metric,
        coarse_fit,
    )
    return rotation, coarse, codebooks
