import torch

from poeem.index.kmeans import kmeans, nearest_centroid


def blobs(k: int, per: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 20
    x = centers.repeat_interleave(per, 0) + torch.randn(k * per, dim, generator=g) * 0.1
    return x, centers


def test_recovers_well_separated_blobs() -> None:
    x, centers = blobs(k=10, per=50, dim=8)
    found = kmeans(x, 10, iters=10, seed=1)
    # every true center has a found centroid within the noise scale, one to one
    d = torch.cdist(centers, found)
    assert d.min(1).values.max() < 0.1
    assert len(set(d.argmin(1).tolist())) == 10


def test_is_seeded_and_reproducible() -> None:
    x = torch.randn(500, 4)
    assert torch.equal(kmeans(x, 16, seed=3), kmeans(x, 16, seed=3))
    assert not torch.equal(kmeans(x, 16, seed=3), kmeans(x, 16, seed=4))


def test_no_empty_clusters_with_duplicate_points() -> None:
    # 40 copies of 5 distinct points plus a few others: naive Lloyd leaves clusters empty
    x = torch.cat([torch.randn(5, 3).repeat(40, 1), torch.randn(20, 3) * 5])
    c = kmeans(x, 20, iters=5, seed=0)
    codes, _ = nearest_centroid(x[None], c[None])
    assert codes.unique().numel() == 20


def test_chunking_gives_same_assignment() -> None:
    x, c = torch.randn(1, 1000, 8), torch.randn(1, 64, 8)
    full = nearest_centroid(x, c, max_chunk_elems=10**9)[0]
    chunked = nearest_centroid(x, c, max_chunk_elems=64 * 7)[0]  # chunks of 7 points
    assert torch.equal(full, chunked)


def test_batched_groups_are_independent() -> None:
    x = torch.randn(3, 300, 4)
    batched = kmeans(x, 8, seed=0)
    assert batched.shape == (3, 8, 4)
    # each group's centroids are means of that group's points: they lie in its hull
    for gi in range(3):
        codes, _ = nearest_centroid(x[gi : gi + 1], batched[gi : gi + 1])
        for j in range(8):
            members = x[gi][codes[0] == j]
            torch.testing.assert_close(batched[gi, j], members.mean(0), atol=1e-4, rtol=1e-4)
