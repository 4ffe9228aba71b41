"""Online policy (``am_max_kv_tokens``): when a request's physical KV reaches its ceiling, re-compact
everything but the sinks and a protected recent window to ``online_ratio`` of its size.

Decides only *whether and what* to compact on this step; the chunk that reaches the ceiling was already
cut there before allocation (``chunking``), and the job is planned and booked by the scheduler. No vLLM
import.
"""

from __future__ import annotations

import logging

from vllm_attnmatch.config import ServerConfig
from vllm_attnmatch.contract.jobs import CompactionLayout
from vllm_attnmatch.engine.layouts import plan_online_layout
from vllm_attnmatch.engine.request_state import CompactionPhase, RequestCompaction

logger = logging.getLogger("vllm.attnmatch.scheduler")


def ceiling(state: RequestCompaction) -> int:
    """Physical length at which the request compacts (later after a lack of free blocks)."""
    return max(state.params.max_kv_tokens, state.online_retry_at)


def online_layout(
    settings: ServerConfig, state: RequestCompaction, req_id: str, num_computed_tokens: int, offset: int
) -> tuple[CompactionLayout | None, bool]:
    """The re-compaction due at the end of this step (or None), and whether it was skipped because the
    ceiling leaves nothing to compact. Moves the request to STOPPED when its limit is reached or nothing
    is left to compact (it then grows past the ceiling)."""
    physical = num_computed_tokens - offset
    state.peak_physical = max(state.peak_physical, physical)
    if physical < ceiling(state):
        return None, False
    limit = settings.online_max_compactions
    if limit is not None and state.online_count >= limit:
        state.move(CompactionPhase.STOPPED)
        return None, False
    layout = plan_online_layout(
        physical_tokens=physical,
        base_offset=offset,
        keep_first=state.params.keep_first,
        recent_tokens=settings.online_recent_tokens,
        ratio=settings.online_ratio,
        min_span_tokens=settings.min_prompt_tokens,
    )
    if layout is None:
        logger.warning(
            "request %s: a KV ceiling of %d leaves nothing to compact after keep_first=%d and "
            "online_recent_tokens=%d; it grows past the ceiling",
            req_id, state.params.max_kv_tokens, state.params.keep_first, settings.online_recent_tokens,
        )
        state.move(CompactionPhase.STOPPED)
        return None, True
    return layout, False


def hit_below_ceiling(hit_blocks: list, num_tokens: int, boundary: int, state: RequestCompaction, block_size: int):
    """An online request reuses ordinary cached blocks only below its ceiling, so that its first
    prefill chunk can still stop at the ceiling and compact there. Returns (blocks, tokens, boundary)."""
    cap = (state.params.max_kv_tokens - 1) // block_size * block_size
    if num_tokens <= cap:
        return None
    return hit_blocks[: cap // block_size], cap, min(boundary, cap)
