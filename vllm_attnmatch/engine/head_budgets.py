"""Non-uniform per-head budgets in the engine (server setting ``head_budgets``).

Some KV heads need many entries to reproduce their attention, others very few; a per-(layer, head)
share file (the authors' ``{"L{layer}H{head}": share}`` schema, e.g. ``vllm_attnmatch/configs/head_budgets/*.json``)
spreads a request's total budget accordingly. vLLM's paged layout is uniform, though: every layer and
head of a request has the same number of slots, so the *physical* compacted span is as long as the largest
head budget and the shorter heads are padded (β = -inf). ``head_budget_max_factor`` caps any head at that
multiple of the uniform budget, which bounds the memory cost to the same factor.

Budgets are planned once, in the scheduler, for the model's *global* KV heads (the share file's head
indices); under tensor parallelism each worker takes its own heads' rows
(``worker.tensor_parallel.rank_head_targets``).
"""

from __future__ import annotations

from vllm_attnmatch.algorithms.budgets import head_budgets, load_head_shares
from vllm_attnmatch.config import CONFIG_KEY, ConfigError, read_head_budgets


class HeadBudgetPlan:
    """Per-(layer, KV head) targets of a span, and the physical length they need."""

    def __init__(self, shares: str | dict[str, float], num_layers: int, num_kv_heads: int, max_factor: float) -> None:
        """``shares``: the share table (what the engine gets: the front end resolved the setting, see
        ``config.resolve_section``), or a bundled name / path read here (tools and tests).
        ``num_kv_heads``: the model's total KV heads (not one tensor-parallel rank's)."""
        table = read_head_budgets(shares) if isinstance(shares, str) else shares
        self.shares = load_head_shares(dict(table))
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.max_factor = max_factor
        if not any(layer < num_layers and head < num_kv_heads for layer, head in self.shares):
            source = repr(shares) if isinstance(shares, str) else "the share table"
            raise ConfigError(f"{CONFIG_KEY}.head_budgets", f"{source} has no share for this model's heads")

    def targets(self, span_tokens: int, uniform_target: int) -> tuple[tuple[int, ...], ...]:
        """``(L, H)`` budgets with the same total as ``uniform_target`` per head (up to rounding)."""
        cap = min(1.0, self.max_factor * uniform_target / span_tokens)
        table = head_budgets(self.shares, self.num_layers, self.num_kv_heads, span_tokens, uniform_target, cap)
        return tuple(tuple(int(x) for x in row) for row in table.tolist())
