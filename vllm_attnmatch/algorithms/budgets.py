"""Budgets: how many entries a block keeps, uniformly or per (layer, KV head).

Why non-uniform: heads differ wildly in how spread their attention is; the authors' optimized schedules
give mid-depth heads several times the uniform share. Two sources: the authors' JSON schema
``{"L{layer}H{head}": share}`` (shares of the total budget, summing to 1) and per-context global scores
(the global top keys over all heads, counted per head). Both are capped at ``max_ratio`` of a head's own
tokens, with the excess water-filled to the other heads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def budget(T: int, ratio: float | None = None, target_tokens: int | None = None) -> int:
    """Kept entries for a block of ``T``: ``max(1, int(ratio·T))`` or ``min(target_tokens, T)``."""
    if (ratio is None) == (target_tokens is None):
        raise ValueError("give exactly one of ratio and target_tokens")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        return max(1, min(T, int(ratio * T)))
    if target_tokens < 1:
        raise ValueError(f"target_tokens must be ≥ 1, got {target_tokens}")
    return max(1, min(int(target_tokens), T))


def load_head_shares(path_or_dict) -> dict[tuple[int, int], float]:
    """Read the authors' ``{"L{layer}H{head}": share}`` schema into ``{(layer, head): share}``."""
    data = path_or_dict if isinstance(path_or_dict, dict) else json.loads(Path(path_or_dict).read_text())
    out = {}
    for key, share in data.items():
        if not (key.startswith("L") and "H" in key):
            raise ValueError(f"bad head-budget key {key!r}; expected 'L<layer>H<head>'")
        layer, head = key[1:].split("H")
        out[(int(layer), int(head))] = float(share)
    return out


def save_head_shares(shares: dict[tuple[int, int], float], path) -> None:
    Path(path).write_text(json.dumps({f"L{l}H{h}": s for (l, h), s in sorted(shares.items())}, indent=1))


def head_budgets(shares: dict[tuple[int, int], float], num_layers: int, num_kv_heads: int, T: int, t: int,
                 max_ratio: float = 0.75) -> torch.Tensor:
    """Per-head budgets ``(L, H)`` from shares: ``int(share · t · L·H)``, capped at ``max_ratio·T``.

    A head missing from ``shares`` gets the uniform budget ``t``. The excess of capped heads is
    redistributed to the others in proportion to their share (water-filling), so the total is kept.
    """
    n = num_layers * num_kv_heads
    p = torch.full((num_layers, num_kv_heads), float("nan"), dtype=torch.float64)
    for (l, h), s in shares.items():
        if l < num_layers and h < num_kv_heads:
            p[l, h] = s
    missing = torch.isnan(p)
    p[missing] = 1.0 / n
    p = p / p.sum()
    total = t * n
    cap = max(1, int(max_ratio * T))
    alloc = p * total
    for _ in range(n):
        over = alloc > cap
        if not over.any():
            break
        excess = (alloc[over] - cap).sum()
        alloc[over] = cap
        free = ~over & (alloc < cap)
        if not free.any():
            break
        alloc[free] += excess * p[free] / p[free].sum()
    out = alloc.floor().long().clamp(1, T)
    return out


def global_head_budgets(scores: torch.Tensor, t: int, max_ratio: float = 0.75) -> torch.Tensor:
    """Per-head budgets ``(L, H)`` from per-context scores ``(L, H, T)``: global top ``t·L·H`` counted per head.

    Scores must be comparable across heads (e.g. rms attention probabilities). Capped at ``max_ratio·T``.
    """
    L, H, T = scores.shape
    k = min(t * L * H, L * H * T)
    flat = scores.reshape(-1)
    top = torch.topk(flat, k).indices
    counts = torch.bincount(top // T, minlength=L * H).reshape(L, H).double()
    return head_budgets({(l, h): float(counts[l, h]) for l in range(L) for h in range(H)}, L, H, T, t, max_ratio)

