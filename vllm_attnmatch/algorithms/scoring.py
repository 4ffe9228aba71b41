"""Per-key importance scores from reference-query attention, used to choose which keys to keep.

Why several reductions: ``rms`` (the authors' default) rewards keys that some queries attend to strongly,
``max`` only the strongest use, ``mean`` is H2O's accumulated attention (biased towards keys that many
queries could see). Optional 1-D max-pooling along the sequence (SnapKV) keeps neighbours of important
keys, which helps local-phrase continuity at small budgets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("rms", "max", "mean", "sum")


def reduce_scores(probs: torch.Tensor, reduction: str = "rms", weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce ``probs (H, n, T)`` over queries to ``(H, T)``; ``weights (H, n)`` optional per-query weights."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown score reduction {reduction!r}; expected one of {REDUCTIONS}")
    if reduction == "max":
        return probs.amax(dim=1)
    if weights is None:
        weights = torch.ones(probs.shape[:2], dtype=probs.dtype, device=probs.device)
    w = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
    if reduction == "rms":
        return torch.sqrt(torch.einsum("hn,hnt->ht", w, probs * probs))
    mean = torch.einsum("hn,hnt->ht", w, probs)
    return mean * probs.shape[1] if reduction == "sum" else mean


def pool_scores(scores: torch.Tensor, kernel: int = 0) -> torch.Tensor:
    """Max-pool ``(H, T)`` scores along the sequence with an odd ``kernel`` (0/1 = off)."""
    if kernel <= 1:
        return scores
    k = kernel if kernel % 2 == 1 else kernel + 1
    return F.max_pool1d(scores.unsqueeze(1), k, stride=1, padding=k // 2).squeeze(1)


def topk_indices(scores: torch.Tensor, t: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Top-``t`` keys per head, always including ``forced (T,)`` bool positions first; sorted by position."""
    s = scores.clone()
    if forced is not None and forced.any():
        s[:, forced] = float("inf")
    idx = torch.topk(s, t, dim=-1).indices
    return torch.sort(idx, dim=-1).values


def protected_mask(T: int, t: int, sinks: int, recent: int, device=None) -> torch.Tensor:
    """``(T,)`` bool of always-kept keys: the first ``sinks`` and the last ``recent`` (capped by ``t``)."""
    m = torch.zeros(T, dtype=torch.bool, device=device)
    sinks = min(sinks, t)
    recent = min(recent, max(t - sinks, 0))
    if sinks:
        m[:sinks] = True
    if recent:
        m[T - recent:] = True
    return m
