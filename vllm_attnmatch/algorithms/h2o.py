"""H2O baseline — Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (NeurIPS 2023, arXiv 2306.14048).

What it scores: each key's *accumulated* attention, the sum over every context query of its plain causal
softmax probability (all query heads of a KV head summed). The budget is split as in the paper: half
heavy hitters (largest accumulated attention), half the most recent keys. Like every method here it also
keeps the same attention sinks as AM (``sinks``). β = 0, original values.

Published strength: every context query (no subsampling) and plain causal visibility (no query gap). The
project's earlier variant (AM's 32-token query gap, 2048 random queries, no sinks) was dropped: it was
not shown to be stronger (issue 12.2 keeps old variants only then); ``query_gap=32`` still gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register
from .eviction import accumulated_attention, keep


@register("h2o")
@dataclass
class H2O(Method):
    """Parameters
    ----------
    recent_fraction : share of the budget kept as the most recent keys (0.5 in the paper).
    sinks : first keys always kept (the same attention sinks as AM).
    """

    recent_fraction: float = 0.5
    sinks: int = 4
    max_queries = None  # every query (class attributes read by compact(), not options)
    query_gap = 0

    def select(self, inp: CompactionInputs) -> torch.Tensor:
        t = inp.target
        return keep(accumulated_attention(inp), t, self.sinks, int(self.recent_fraction * t))

