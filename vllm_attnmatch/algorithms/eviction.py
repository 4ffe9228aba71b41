"""Shared parts of the eviction baselines: causal attention rows computed in query chunks, and the pick.

Why chunks: published H2O scores every context query against every key; at 4096 tokens that is a
12k × 4k matrix per KV head, so scores are accumulated chunk by chunk instead of through the fitted
methods' full target tensor. Why their own defaults (``max_queries = None``, ``query_gap = 0``): the
baselines are measured at their published strength — every query, plain causal attention; AM's 32-token
query gap is AM's own device (issue 12.2).
"""

from __future__ import annotations

from typing import Iterator

import torch

from .base import CompactionInputs
from .scoring import protected_mask, topk_indices
from .targets import logits, visibility

#: query rows per chunk when accumulating attention (bounds memory at H × CHUNK × T floats)
CHUNK = 1024


def attention_chunks(inp: CompactionInputs, rows: torch.Tensor | None = None,
                     chunk: int = CHUNK) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(row indices, probs (H, c, T))`` over the reference queries (or ``rows`` of them), causal (with
    the gap :func:`compact` chose) when positions are known; a query that sees no key gives a zero row."""
    idx = torch.arange(inp.queries.shape[1], device=inp.queries.device) if rows is None else rows
    for start in range(0, idx.numel(), chunk):
        sel = idx[start:start + chunk]
        vis = (visibility(inp.query_positions[sel], inp.key_positions, inp.gap) if inp.is_causal else None)
        s = logits(inp.queries[:, sel], inp.keys, inp.scale, inp.bias, vis)
        yield sel, torch.softmax(s, dim=-1).nan_to_num_(0.0)


def accumulated_attention(inp: CompactionInputs, rows: torch.Tensor | None = None) -> torch.Tensor:
    """``(H, T)`` attention summed over the reference queries (all query heads of a KV head pooled)."""
    total = torch.zeros(inp.num_heads, inp.length, device=inp.keys.device)
    for _, p in attention_chunks(inp, rows):
        total += p.sum(1)
    return total


def keep(scores: torch.Tensor, t: int, sinks: int, recent: int) -> torch.Tensor:
    """Top-``t`` per head by ``scores (H, T)``, the first ``sinks`` and last ``recent`` keys always kept."""
    return topk_indices(scores, t, protected_mask(scores.shape[1], t, sinks, recent, scores.device))
