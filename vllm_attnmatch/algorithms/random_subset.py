"""Random baseline: a uniformly random subset of ``t`` entries per head (seeded). The floor any method must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register


@register("random")
@dataclass
class RandomSubset(Method):
    def select(self, inp: CompactionInputs) -> torch.Tensor:
        rows = [torch.randperm(inp.length, generator=inp.generator)[: inp.target] for _ in range(inp.num_heads)]
        return torch.stack(rows).to(inp.keys.device)
