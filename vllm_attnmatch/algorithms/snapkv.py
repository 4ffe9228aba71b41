"""SnapKV baseline (Li et al. 2024): score keys by an observation window of the latest queries.

The last ``window`` positions' queries (all query heads of the KV head pooled) vote with their mean
attention, max-pooled along the sequence; the window's own keys are always kept. β = 0, original values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register
from .scoring import pool_scores, protected_mask, topk_indices
from .targets import compute_targets


@register("snapkv")
@dataclass
class SnapKV(Method):
    """Parameters
    ----------
    window : observation window in positions (queries at the latest ``window`` positions).
    pool : max-pool kernel (7 in the paper).
    """

    window: int = 32
    pool: int = 7

    def select(self, inp: CompactionInputs) -> torch.Tensor:
        q, vis = inp.queries, inp.visible
        if inp.query_positions is not None:
            qp = inp.query_positions.to(q.device)
            rows = qp > qp.max() - self.window
            q = q[:, rows]
            vis = vis[rows] if vis is not None else None
        tg = compute_targets(inp.keys, inp.values, q, inp.scale, inp.bias, vis)
        scores = pool_scores(tg.probs.mean(1), self.pool)
        t = inp.target
        recent = min(self.window, t // 2) if inp.query_positions is not None else 0
        return topk_indices(scores, t, protected_mask(inp.length, t, 0, recent, scores.device))
