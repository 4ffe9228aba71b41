"""Truncation baseline: keep the first ``t`` entries of the block (the document cut short). No queries used."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register


@register("truncate")
@dataclass
class Truncate(Method):
    def select(self, inp: CompactionInputs) -> torch.Tensor:
        return torch.arange(inp.target, device=inp.keys.device).expand(inp.num_heads, inp.target).clone()
