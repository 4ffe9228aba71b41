"""The messages between the scheduler and the workers, and the geometry of one compaction.

Plain picklable dataclasses, no vLLM import: the scheduler attaches a :class:`StepPlan` to each
``SchedulerOutput`` (the only channel scheduler → worker, so ordering is the step order), and the worker
attaches :class:`CompactionResult` s to the ``ModelRunnerOutput`` it returns.

Geometry of a request whose first ``num_tokens`` KV entries are compacted (logical positions)::

    [0, keep_first)                  raw         -> physical [0, keep_first)
    [keep_first, span_end)           compacted   -> physical [keep_first, keep_first + target)
    [span_end, num_tokens)           raw tail    -> physical [keep_first + target, physical_len)

``offset = num_tokens - physical_len`` is what later tokens subtract from their logical position to find
their physical slot; their RoPE position stays logical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm_attnmatch.algorithms.budgets import budget


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CompactionLayout:
    """Where the compacted span lies and how long the request is physically afterwards."""

    num_tokens: int  # KV entries that exist before the compaction (logical length)
    keep_first: int
    span_end: int  # end of the compacted span (exclusive), logical
    target: int  # entries the span is compacted to

    @property
    def span_tokens(self) -> int:
        return self.span_end - self.keep_first

    @property
    def tail_tokens(self) -> int:
        return self.num_tokens - self.span_end

    @property
    def physical_len(self) -> int:
        return self.keep_first + self.target + self.tail_tokens

    @property
    def offset(self) -> int:
        return self.num_tokens - self.physical_len


def plan_layout(
    num_tokens: int,
    prompt_tokens: int,
    keep_first: int,
    keep_last: int,
    ratio: float | None,
    target_tokens: int | None,
    min_span_tokens: int,
) -> CompactionLayout | None:
    """Layout for compacting a request's prompt (minus the kept ranges), or None if too short.

    ``num_tokens`` may exceed ``prompt_tokens`` when a preempted request is re-prefilled together with
    tokens it had generated; those stay raw in the tail.
    """
    keep_first = min(keep_first, prompt_tokens)
    span_end = max(keep_first, prompt_tokens - keep_last)
    span = span_end - keep_first
    if span < max(1, min_span_tokens):
        return None
    return CompactionLayout(
        num_tokens=num_tokens,
        keep_first=keep_first,
        span_end=span_end,
        target=budget(span, ratio, target_tokens),
    )


@dataclass(frozen=True)
class CompactionJob:
    """One request's compaction, run by every worker right after the forward of the step that
    completes its prefill. Workers read KV from ``src_block_ids`` and write the compacted layout into
    the fresh ``dst_block_ids`` (never in place: the source blocks stay valid prefix-cache entries)."""

    req_id: str
    layout: CompactionLayout
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    method: str
    queries: str
    chunk_tokens: int | None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepPlan:
    """Everything a worker needs from the plugin for one step (attached to ``SchedulerOutput``).

    ``offsets`` is authoritative every step: a request absent from it is uncompacted (this is how a
    preempted request's offset is dropped without a separate message).
    """

    jobs: list[CompactionJob] = field(default_factory=list)
    # req_id -> new block ids (replace the request's whole block-table row before this step)
    swaps: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # req_id -> logical - physical length, for every compacted request in the batch
    offsets: dict[str, int] = field(default_factory=dict)
    # req_id -> keep every k-th prefill query row as a reference query (0 = do not capture)
    capture_stride: dict[str, int] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return not (self.jobs or self.swaps or self.offsets or self.capture_stride)


@dataclass(frozen=True)
class CompactionResult:
    """What a worker reports back for one job (read by the scheduler in ``update_from_output``)."""

    req_id: str
    ok: bool
    seconds: float
    tokens_before: int
    tokens_after: int
    fit_error: float = float("nan")
    error: str = ""


SCHEDULER_OUTPUT_ATTR = "attnmatch_plan"
RUNNER_OUTPUT_ATTR = "attnmatch_results"
