"""SnapKV baseline — Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"
(NeurIPS 2024, arXiv 2404.14469).

What it scores: the attention of the *observation window* — the queries of the last ``window`` = 32
positions of the prompt — on each earlier key (plain causal softmax over the whole block), averaged over
the window, max-pooled along the sequence with kernel 7 (the paper's LongBench setting: window 32,
kernel 7, max-pool) per query head, then averaged over the query heads that share the KV head (GQA, as
SnapKV issue 22 / kvpress do). The window's own keys are always kept, and the same attention sinks as
AM. At budgets below two windows the kept window is capped at half the budget, so the selection does
not degenerate into StreamingLLM. β = 0, original values.

Published strength: all window queries, plain causal visibility (no query gap). The project's earlier
variant (AM's 32-token gap inside the window, 2048 random queries, no sinks) was dropped: it was not shown
to be stronger (issue 12.2 keeps old variants only then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register
from .eviction import attention_chunks, keep
from .scoring import pool_scores


def _window_rows(inp: CompactionInputs, window: int) -> torch.Tensor:
    """Rows of the reference queries at the latest ``window`` positions (all rows without positions)."""
    n = inp.queries.shape[1]
    if inp.query_positions is None:
        return torch.arange(n, device=inp.queries.device)
    qp = inp.query_positions.to(inp.queries.device)
    return (qp > qp.max() - window).nonzero().squeeze(-1)


def _per_head_groups(positions: torch.Tensor | None, rows: int) -> int:
    """How many query heads the pooled rows hold, when they are whole copies of one position list
    (``group_queries`` order); 1 when that cannot be told (then the mean is pooled once)."""
    if positions is None:
        return 1
    uniq = positions.unique().numel()
    g = rows // max(uniq, 1)
    if g > 1 and rows == g * uniq and bool((positions.reshape(g, uniq) == positions[:uniq]).all()):
        return g
    return 1


@register("snapkv")
@dataclass
class SnapKV(Method):
    """Parameters
    ----------
    window : observation window in positions (queries at the latest ``window`` positions).
    pool : max-pool kernel along the sequence (7).
    sinks : first keys always kept (the same attention sinks as AM).
    """

    window: int = 32
    pool: int = 7
    sinks: int = 4
    max_queries = None
    query_gap = 0

    def scores(self, inp: CompactionInputs) -> torch.Tensor:
        rows = _window_rows(inp, self.window)
        probs = torch.cat([p for _, p in attention_chunks(inp, rows)], dim=1)  # (H, G·w, T)
        qp = inp.query_positions[rows.to(inp.query_positions.device)] if inp.query_positions is not None else None
        g = _per_head_groups(qp, probs.shape[1])
        H, _, T = probs.shape
        per_head = probs.reshape(H * g, -1, T).mean(1)  # mean over the window, per query head
        if inp.query_positions is not None:
            per_head[:, T - min(self.window, T):] = 0.0  # pool the earlier keys only (the window is kept)
        return pool_scores(per_head, self.pool).reshape(H, g, T).mean(1)

    def select(self, inp: CompactionInputs) -> torch.Tensor:
        t = inp.target
        recent = min(self.window, t // 2) if inp.query_positions is not None else 0
        return keep(self.scores(inp), t, self.sinks, recent)

