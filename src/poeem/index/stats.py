"""Index health metrics: distortion and code usage, cheap enough to log every step."""

from __future__ import annotations

import torch

# per code space, how often each code occurs: (D, K) sub-code counts and (1, coarse_K) list
# counts (None without lists)
UsageCounts = tuple[torch.Tensor, torch.Tensor | None]


def code_counts(codes: torch.Tensor, num_codes: int) -> torch.Tensor:
    """(G, num_codes) occurrences of each code in (G, B) integer codes of G code spaces."""
    g = codes.shape[0]
    offsets = torch.arange(g, device=codes.device).unsqueeze(1) * num_codes
    return torch.bincount((codes.long() + offsets).flatten(), minlength=g * num_codes).view(g, num_codes)


def usage_perplexity(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct codes in use and the perplexity exp(H) of their empirical distribution.

    Perplexity is num_codes for perfectly balanced usage and 1 when one code takes all.

    Args:
        counts: (G, num_codes) occurrences of each code of G code spaces (:func:`code_counts`).

    Returns:
        used: (G,) float distinct codes; perplexity: (G,) float.
    """
    p = counts.float() / counts.sum(-1, keepdim=True).clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return (counts > 0).sum(-1).float(), entropy.exp()


def batch_usage_counts(
    coarse_codes: torch.Tensor | None, codes: torch.Tensor, num_coarse: int, codebook_size: int
) -> UsageCounts:
    """The :data:`UsageCounts` of (N,) lists (or None) and (N, D) sub-codes."""
    lists = code_counts(coarse_codes.unsqueeze(0), num_coarse) if coarse_codes is not None else None
    return code_counts(codes.T, codebook_size), lists


def usage_stats(counts: UsageCounts) -> dict[str, torch.Tensor]:
    """``subcodes_used`` and ``subcode_perplexity`` (means over subspaces), and with lists
    ``coarse_used`` and ``coarse_perplexity``."""
    sub, lists = counts
    used, ppl = usage_perplexity(sub)
    stats = {"subcodes_used": used.mean(), "subcode_perplexity": ppl.mean()}
    if lists is not None:
        used, ppl = usage_perplexity(lists)
        stats["coarse_used"], stats["coarse_perplexity"] = used[0], ppl[0]
    return stats


def index_stats(x: torch.Tensor, x_hat: torch.Tensor, usage: UsageCounts) -> dict[str, torch.Tensor]:
    """Health of quantized vectors, as detached scalar tensors.

    Args:
        x: (B, dim) original vectors; x_hat: (B, dim) reconstructions.
        usage: code counts (of this batch, or of a window of batches).

    Returns:
        ``distortion`` (mean ||x - x_hat||^2), ``relative_distortion`` (sum ||x - x_hat||^2 /
        sum ||x||^2), and the :func:`usage_stats` of ``usage``.
    """
    with torch.no_grad():
        err = (x - x_hat).pow(2).sum(-1)
        stats = {
            "distortion": err.mean(),
            "relative_distortion": err.sum() / x.pow(2).sum().clamp_min(1e-12),
        }
        return stats | usage_stats(usage)
