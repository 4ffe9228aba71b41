"""H2O baseline (Zhang et al. 2023): heavy hitters by accumulated attention plus a recent window.

Half the budget goes to the most recent keys, half to the keys with the largest attention summed over
all (causal) reference queries. β = 0, original values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register
from .scoring import protected_mask, topk_indices


@register("h2o")
@dataclass
class H2O(Method):
    """Parameters
    ----------
    recent_fraction : share of the budget kept as the most recent keys.
    """

    recent_fraction: float = 0.5

    def select(self, inp: CompactionInputs) -> torch.Tensor:
        t = inp.target
        scores = inp.targets.probs.sum(1)
        forced = protected_mask(inp.length, t, 0, int(self.recent_fraction * t), scores.device)
        return topk_indices(scores, t, forced)
