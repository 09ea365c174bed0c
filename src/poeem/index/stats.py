"""Index health metrics: distortion and code usage, cheap enough to log every step."""

from __future__ import annotations

import torch


def usage_perplexity(codes: torch.Tensor, num_codes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct codes in use and the perplexity exp(H) of their empirical distribution.

    Perplexity is num_codes for perfectly balanced usage and 1 when one code takes all.

    Args:
        codes: (G, B) integer codes of G independent code spaces.
        num_codes: size of each code space.

    Returns:
        used: (G,) float distinct codes; perplexity: (G,) float.
    """
    g = codes.shape[0]
    offsets = torch.arange(g, device=codes.device).unsqueeze(1) * num_codes
    counts = torch.bincount((codes.long() + offsets).flatten(), minlength=g * num_codes)
    p = counts.view(g, num_codes).float() / codes.shape[1]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return (counts.view(g, num_codes) > 0).sum(-1).float(), entropy.exp()


def index_stats(
    x: torch.Tensor,
    x_hat: torch.Tensor,
    coarse_codes: torch.Tensor | None,
    codes: torch.Tensor,
    num_coarse: int,
    codebook_size: int,
) -> dict[str, torch.Tensor]:
    """Health of a batch of quantized vectors, as detached scalar tensors.

    Args:
        x: (B, dim) original vectors; x_hat: (B, dim) reconstructions.
        coarse_codes: (B,) or None; codes: (B, D).

    Returns:
        ``distortion`` (mean ||x - x_hat||^2), ``relative_distortion`` (sum ||x - x_hat||^2 /
        sum ||x||^2), ``subcodes_used`` and ``subcode_perplexity`` (means over subspaces), and
        with a coarse quantizer ``coarse_used`` and ``coarse_perplexity``.
    """
    with torch.no_grad():
        err = (x - x_hat).pow(2).sum(-1)
        stats = {
            "distortion": err.mean(),
            "relative_distortion": err.sum() / x.pow(2).sum().clamp_min(1e-12),
        }
    return stats | code_usage(coarse_codes, codes, num_coarse, codebook_size)


def code_usage(
    coarse_codes: torch.Tensor | None, codes: torch.Tensor, num_coarse: int, codebook_size: int
) -> dict[str, torch.Tensor]:
    """``subcodes_used`` and ``subcode_perplexity`` (means over subspaces), and with a coarse
    quantizer ``coarse_used`` and ``coarse_perplexity``, of (N, D) codes and (N,) lists."""
    with torch.no_grad():
        stats = {}
        used, ppl = usage_perplexity(codes.T, codebook_size)
        stats["subcodes_used"], stats["subcode_perplexity"] = used.mean(), ppl.mean()
        if coarse_codes is not None:
            used, ppl = usage_perplexity(coarse_codes.unsqueeze(0), num_coarse)
            stats["coarse_used"], stats["coarse_perplexity"] = used[0], ppl[0]
    return stats
