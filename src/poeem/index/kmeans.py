"""Seeded, memory-bounded k-means in torch, batched over independent groups.

PQ runs one k-means per subspace; batching them as ``G`` groups turns D small problems into one
tensor op. Distances are computed in chunks of points so that at most ``max_chunk_elems``
distance entries exist at once (1M x 4096 never materialises).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from poeem.errors import PoeemError

DEFAULT_CHUNK_ELEMS = 1 << 20  # distance entries per chunk: 4 MiB of float32, cache-friendly


def nearest_centroid(
    x: torch.Tensor,
    c: torch.Tensor,
    max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    inner_product: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of, and squared distance to, the nearest centroid of each point, in chunks.

    Args:
        x: (G, n, d) float points.
        c: (G, k, d) float centroids.
        max_chunk_elems: upper bound on G * chunk * k distance entries held at once.
        inner_product: pick the centroid of largest inner product instead of the nearest.

    Returns:
        codes: (G, n) int64 nearest-centroid indices.
        dists: (G, n) float squared distances to that centroid (minus the inner product with
        ``inner_product``).
    """
    g, n, _ = x.shape
    k = c.shape[1]
    chunk = max(1, max_chunk_elems // max(1, g * k))
    codes = torch.empty(g, n, dtype=torch.long, device=x.device)
    dists = torch.empty(g, n, dtype=x.dtype, device=x.device)
    c2 = torch.zeros_like(c[..., 0]) if inner_product else (c * c).sum(-1)
    c2 = c2.unsqueeze(1)  # (G, 1, k)
    ct = c.transpose(1, 2)
    for start in range(0, n, chunk):
        xs = x[:, start : start + chunk]
        # (G, chunk, k): ||c||^2 - 2 <x, c>, or -<x, c>
        partial = torch.baddbmm(c2, xs, ct, alpha=-1 if inner_product else -2)
        best, codes[:, start : start + chunk] = partial.min(-1)
        if inner_product:
            dists[:, start : start + chunk] = best
        else:
            dists[:, start : start + chunk] = (best + (xs * xs).sum(-1)).clamp_min_(0)
    return codes, dists


def _weighted_pick(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per group, the index drawn with probability proportional to ``weights`` (G, n), given
    uniforms ``u`` (G,) in [0, 1). Device-agnostic, so seeded draws match on CPU and CUDA."""
    cdf = weights.cumsum(-1)  # (G, n)
    total = cdf[:, -1:]
    target = u.unsqueeze(-1) * total
    idx = torch.searchsorted(cdf, target).squeeze(-1)
    return idx.clamp_max_(weights.shape[1] - 1)


def kmeans_plus_plus(
    x: torch.Tensor,
    k: int,
    generator: torch.Generator,
    sample_size: int | None = None,
) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling), batched over groups.

    Args:
        x: (G, n, d) float points.
        k: number of centroids.
        generator: a CPU generator; all randomness comes from it.
        sample_size: seed from a random subset of this many points (default: 16 k points, at
            most 100,000 but never fewer than k), which keeps seeding O(sample_size * k * d).

    Returns:
        (G, k, d) initial centroids, each one a data point.
    """
    g, n, _ = x.shape
    m = min(n, sample_size or max(k, min(16 * k, 100_000)))
    if m < n:
        sub = torch.randperm(n, generator=generator)[:m].to(x.device)
        x = x[:, sub]
    rows = torch.arange(g, device=x.device)
    uniforms = torch.rand(k, g, generator=generator).to(x.device)  # (k, G)
    first = (uniforms[0] * m).long().clamp_max_(m - 1)
    # Squared distances to one new centroid c are |x|^2 - 2 <x, c> + |c|^2: a (G, m) product
    # instead of a (G, m, d) difference per step. Per-step (G, m, d) temporaries interleaved
    # with small allocations fragmented glibc's heap: 24 GB resident for k = 4096 on 262k points.
    x2 = (x * x).sum(-1, keepdim=True)  # (G, m, 1)
    centroids = x.new_empty(g, k, x.shape[2])
    centroids[:, 0] = x[rows, first]
    closest = _squared_distances(x, x2, centroids[:, 0])  # (G, m)
    for i in range(1, k):
        # A group whose points are all already centroids has zero weight: fall back to uniform.
        weights = torch.where(closest.sum(-1, keepdim=True) > 0, closest, torch.ones_like(closest))
        pick = _weighted_pick(weights, uniforms[i])
        centroids[:, i] = x[rows, pick]
        torch.minimum(closest, _squared_distances(x, x2, centroids[:, i]), out=closest)
    return centroids


def _squared_distances(x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(G, m) squared distances of points x (G, m, d), with norms x2 (G, m, 1), to c (G, d)."""
    dist = torch.baddbmm(x2, x, c.unsqueeze(-1), alpha=-2).squeeze(-1)  # (G, m)
    return dist.add_((c * c).sum(-1, keepdim=True)).clamp_min_(0)


def kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    max_chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    progress: bool = False,
    spherical: bool = False,
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding and empty-cluster repair, batched over groups.

    With ``spherical``, centroids are unit vectors, points go to the centroid of largest inner
    product, and each centroid becomes the normalised sum of its points: Lloyd's algorithm for
    maximising sum_i <x_i, u_a(i)>.

    Runs on the device of ``x`` in float32. Seeded: the same input and seed give the same
    centroids. An empty cluster is re-seeded at the point farthest from its centroid, so all k
    centroids stay in use.

    Args:
        x: (n, d) or (G, n, d) float points.
        k: number of centroids; needs n >= k.
        iters: Lloyd iterations after seeding.
        seed: random seed.
        max_chunk_elems: memory bound on distance entries held at once.
        progress: show a progress bar.
        spherical: unit centroids and inner-product assignment (see above).

    Returns:
        (k, d) or (G, k, d) float32 centroids, matching the rank of ``x``.
    """
    squeeze = x.dim() == 2
    xg = (x.unsqueeze(0) if squeeze else x).float()
    if xg.dim() != 3:
        raise PoeemError(
            "k-means input", "a (n, d) or (G, n, d) tensor", f"shape {tuple(x.shape)}", "reshape the points"
        )
    g, n, d = xg.shape
    if n < k:
        raise PoeemError(
            "k-means input",
            f"at least k={k} points",
            f"{n} points",
            "pass more points or use fewer centroids",
        )
    generator = torch.Generator().manual_seed(seed)
    c = kmeans_plus_plus(xg, k, generator)
    if spherical:
        c = torch.nn.functional.normalize(c, dim=-1)
    for _ in tqdm(range(iters), desc=f"k-means k={k}", disable=None if progress else True, leave=False):
        # (G, n); for spherical, dists are minus the inner product, so "far" still means badly served
        codes, dists = nearest_centroid(xg, c, max_chunk_elems, inner_product=spherical)
        sums = torch.zeros(g, k, d, device=xg.device).scatter_add_(1, codes.unsqueeze(-1).expand(g, n, d), xg)
        counts = torch.zeros(g, k, device=xg.device).scatter_add_(1, codes, torch.ones_like(dists))
        update = (
            torch.nn.functional.normalize(sums, dim=-1)
            if spherical
            else sums / counts.clamp_min(1).unsqueeze(-1)
        )
        c = torch.where(counts.unsqueeze(-1) > 0, update, c)
        empty = counts == 0  # (G, k)
        if empty.any():
            c = _reseed_empty(xg, c, empty, dists)
            if spherical:
                c = torch.nn.functional.normalize(c, dim=-1)
    return c.squeeze(0) if squeeze else c


def _reseed_empty(x: torch.Tensor, c: torch.Tensor, empty: torch.Tensor, dists: torch.Tensor) -> torch.Tensor:
    """Move each empty centroid onto one of the points farthest from their centroids.

    x: (G, n, d); c: (G, k, d); empty: (G, k) bool; dists: (G, n). Returns (G, k, d)."""
    c = c.clone()
    for gi in torch.nonzero(empty.any(-1)).flatten().tolist():
        slots = torch.nonzero(empty[gi]).flatten()
        far = dists[gi].topk(len(slots)).indices
        c[gi, slots] = x[gi, far]
    return c
