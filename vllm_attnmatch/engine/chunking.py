"""Chunk planning: where a compacting request's prefill chunk must stop, decided *before* allocation.

vLLM caps every step's ``num_new_tokens`` before it allocates and hashes blocks (the long-prefill
threshold, the token budget, Mamba's block-aligned split, the MTP lookahead reserve in
``Scheduler._reserve_prefill_lookahead``). The plugin caps it in the same place, so a chunk never
allocates or registers blocks past the point where the request compacts:

- a prompt that compacts stops at its span's end, so the rest of the prompt is prefilled over the
  compacted prefix (exactly what a later request reusing the stored prefix computes);
- an online request stops at its KV ceiling (logical = ceiling + offset);
- a request whose compaction is in flight is not scheduled at all (0 tokens) until the job is booked,
  nor one whose job waits for destination blocks.

No vLLM import: the scheduler calls :func:`clamp_new_tokens` from its hook.
"""

from __future__ import annotations

import math

from vllm_attnmatch.engine.request_state import CompactionPhase, RequestCompaction


def stop_position(state: RequestCompaction, offset: int) -> int | None:
    """The logical position this request's computed tokens must not pass before it compacts, or None."""
    if state.phase is CompactionPhase.PREFILLING and state.lookup_hit is None:
        return state.layout.span_end
    if state.phase is CompactionPhase.WATCHING:
        return max(state.params.max_kv_tokens, state.online_retry_at) + offset
    return None


def clamp_new_tokens(state: RequestCompaction, num_computed_tokens: int, num_new_tokens: int, offset: int) -> int:
    """``num_new_tokens`` for this step, cut at the request's stop position (0 while a job is in flight)."""
    if state.phase is CompactionPhase.IN_FLIGHT or state.awaiting_blocks:
        return 0
    stop = stop_position(state, offset)
    if stop is None or num_computed_tokens >= stop:
        return num_new_tokens
    return min(num_new_tokens, stop - num_computed_tokens)


def prefill_capture_stride(span_end: int, max_query_tokens: int) -> int:
    """Keep every k-th prefill query row so that at most ``max_query_tokens`` rows are captured."""
    return max(1, math.ceil(span_end / max_query_tokens))


def online_capture_stride(num_scheduled: int, num_tokens: int, ring_tokens: int) -> int:
    """Decode rows are all kept (a bounded ring trims them); a prefill chunk is strided to the ring."""
    return 1 if num_scheduled == 1 else max(1, math.ceil(num_tokens / ring_tokens))
