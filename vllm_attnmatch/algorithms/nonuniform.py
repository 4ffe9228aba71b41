"""Non-uniform per-head budgets within one layer: compact each KV head to its own size, pad to the longest.

Why padding: the engine stores a layer as one ``(H_kv, t_max)`` block. Shorter heads are padded with zero
keys/values and a very negative finite β (``PAD_BETA``; exp(PAD_BETA) underflows to 0, so the slot carries
no attention) and index −1, so padding is recognisable without a separate length.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import CompactionResult, compact, sum_timings
from .targets import compute_targets, visibility

PAD_BETA = -1.0e4


def compact_per_head(keys, values, queries, targets: Sequence[int], method: str = "highest_attention",
                     **options) -> CompactionResult:
    """:func:`compact` with one budget per KV head; shorter heads are padded after their entries with
    β = ``PAD_BETA`` (no attention) and index −1, which is how the engine stores them."""
    H, T, d = keys.shape
    if len(targets) != H:
        raise ValueError(f"need one target per KV head ({H}), got {len(targets)}")
    bias = options.pop("bias", None)
    parts = []
    for h, t_h in enumerate(targets):
        opts = dict(options)
        if bias is not None:
            opts["bias"] = bias[h:h + 1]
        parts.append(compact(keys[h:h + 1], values[h:h + 1], queries[h:h + 1], max(1, min(int(t_h), T)), method, **opts))
    t_max = max(p.keys.shape[1] for p in parts)
    K = keys.new_zeros(H, t_max, d)
    V = values.new_zeros(H, t_max, d)
    beta = torch.full((H, t_max), PAD_BETA, dtype=torch.float32, device=keys.device)
    idx = torch.full((H, t_max), -1, dtype=torch.long, device=keys.device)
    for h, p in enumerate(parts):
        n = p.keys.shape[1]
        K[h, :n], V[h, :n], beta[h, :n], idx[h, :n] = p.keys[0], p.values[0], p.beta[0], p.indices[0]
    errs = torch.tensor([p.fit_error for p in parts])
    return CompactionResult(K, beta, V, idx, method=method, fit_error=float(errs.nanmean()),
                            seconds=sum(p.seconds for p in parts), timings=sum_timings(parts))


def head_scores(keys, queries, query_positions=None, key_positions=None, reduction: str = "rms",
                scale: float | None = None) -> torch.Tensor:
    """``(H, T)`` key scores comparable across heads and layers (softmax mass), for global budgets."""
    from .scoring import reduce_scores

    dev = keys.device
    vis = visibility(query_positions.to(dev) if query_positions is not None else None,
                     key_positions.to(dev) if key_positions is not None else None)
    tg = compute_targets(keys, keys, queries, scale or keys.shape[-1] ** -0.5, visible=vis)
    return reduce_scores(tg.probs, reduction)
