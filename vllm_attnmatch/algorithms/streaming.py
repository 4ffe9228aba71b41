"""StreamingLLM baseline — Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks"
(ICLR 2024, arXiv 2309.17453).

What it keeps: no score at all — the first ``sinks`` keys (the attention sinks, 4 in the paper and the
same as AM's) plus the most recent keys filling the rest of the budget. No queries used. β = 0, original
values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register
from .scoring import protected_mask


@register("streaming")
@dataclass
class Streaming(Method):
    """Parameters
    ----------
    sinks : first keys kept (the rest of the budget is the most recent keys).
    """

    sinks: int = 4

    def select(self, inp: CompactionInputs) -> torch.Tensor:
        t = inp.target
        m = protected_mask(inp.length, t, self.sinks, t, inp.keys.device)
        return m.nonzero().squeeze(-1).expand(inp.num_heads, t).clone()
