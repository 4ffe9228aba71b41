"""Reference queries in the layout :func:`compact` wants.

Why pooled: several query heads share one KV head (GQA); the compacted block of a KV head must serve all
of them, so their queries are pooled into one set of n = G·n_tokens rows (the authors do the same).
"""

from __future__ import annotations

import torch


def group_queries(queries: torch.Tensor, num_kv_heads: int, positions: torch.Tensor | None = None):
    """``(n, H_q, d)`` post-RoPE queries → ``(H_kv, G·n, d)`` and the matching ``(G·n,)`` positions.

    Query head ``j·G + g`` belongs to KV head ``j`` (HF ``repeat_kv`` convention).
    """
    n, Hq, d = queries.shape
    g = Hq // num_kv_heads
    q = queries.reshape(n, num_kv_heads, g, d).permute(1, 2, 0, 3).reshape(num_kv_heads, g * n, d)
    if positions is None:
        positions = torch.arange(n, device=queries.device)
    return q, positions.repeat(g)
