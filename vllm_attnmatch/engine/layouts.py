"""How the scheduler plans the geometry of a compaction (:class:`~vllm_attnmatch.contract.jobs.CompactionLayout`,
whose fields are explained in :mod:`vllm_attnmatch.contract.jobs`): where the span ends, how many entries it
keeps, how much padding completes its last block. No vLLM import."""

from __future__ import annotations

from dataclasses import replace

from vllm_attnmatch.algorithms.budgets import budget
from vllm_attnmatch.contract.jobs import CompactionLayout, block_padding


def plan_layout(
    num_tokens: int | None,
    prompt_tokens: int,
    keep_first: int,
    keep_last: int,
    ratio: float | None,
    target_tokens: int | None,
    min_span_tokens: int,
    block_size: int,
) -> CompactionLayout | None:
    """Layout for compacting a request's prompt prefix, or None if the span is too short.

    The span ends at the last block boundary that leaves at least ``max(keep_last, 1)`` prompt tokens
    raw (the last prompt token is always computed by vLLM, and a compacted prefix never includes it).
    ``num_tokens`` (KV entries present when compacting) defaults to ``span_end``: the engine compacts
    as soon as the prefix is prefilled, and the rest of the prompt is prefilled over the result.
    """
    keep_first = min(keep_first, prompt_tokens)
    span_end = (prompt_tokens - max(keep_last, 1)) // block_size * block_size
    if span_end - keep_first < max(1, min_span_tokens):
        return None
    layout = layout_for_span(span_end, keep_first, ratio, target_tokens, block_size)
    return layout if num_tokens is None else replace(layout, num_tokens=num_tokens)


def layout_for_span(
    span_end: int, keep_first: int, ratio: float | None, target_tokens: int | None, block_size: int
) -> CompactionLayout:
    """The layout that compacts ``[keep_first, span_end)`` (block-aligned ``span_end``), right after it
    is prefilled. Also how a request looks up shorter stored prefixes than its own."""
    target = budget(span_end - keep_first, ratio, target_tokens)
    pad = block_padding(keep_first + target, block_size)
    return CompactionLayout(num_tokens=span_end, keep_first=keep_first, span_end=span_end, target=target, pad=pad)


def widen_layout(layout: CompactionLayout, target: int, block_size: int) -> CompactionLayout:
    """The same span with a longer physical target (non-uniform head budgets pad to their largest)."""
    if target <= layout.target:
        return layout
    return replace(layout, target=target, pad=block_padding(layout.keep_first + target, block_size))


def plan_online_layout(
    physical_tokens: int, base_offset: int, keep_first: int, recent_tokens: int, ratio: float, min_span_tokens: int
) -> CompactionLayout | None:
    """Layout that compacts a request's whole physical cache except ``keep_first`` sinks and the
    ``recent_tokens`` newest entries to ``ratio`` of its size, or None if that span is too short."""
    keep_first = min(keep_first, physical_tokens)
    span_end = physical_tokens - max(recent_tokens, 1)
    span = span_end - keep_first
    if span < max(2, min_span_tokens):
        return None
    target = min(span - 1, max(1, round(ratio * span)))
    return CompactionLayout(
        num_tokens=physical_tokens,
        keep_first=keep_first,
        span_end=span_end,
        target=target,
        online=True,
        base_offset=base_offset,
    )
