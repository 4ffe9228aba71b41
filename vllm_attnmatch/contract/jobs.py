"""The messages between the scheduler and the workers, and the geometry of one compaction.

Plain picklable dataclasses, no vLLM import and nothing of either side: the scheduler attaches a
:class:`StepPlan` to each ``SchedulerOutput`` (the only channel scheduler → worker, so ordering is the step
order), and the worker attaches :class:`CompactionResult` s to the ``ModelRunnerOutput`` it returns. How the
scheduler chooses a layout is its own business (``engine.layouts``); this module only says what one means.

Geometry of a compaction (logical positions on the left, physical slots on the right)::

    [0, keep_first)            raw          -> [0, keep_first)
    [keep_first, span_end)     compacted    -> [keep_first, keep_first + target)
                               padding      -> [keep_first + target, prefix_physical_len)   β = -inf
    [span_end, num_tokens)     raw tail     -> [prefix_physical_len, physical_len)

``span_end`` is block-aligned and the padding fills the last compacted block, so the compacted prefix is
made of whole blocks that depend only on the first ``span_end`` tokens: they can be shared by later
requests with the same prefix (the compacted-prefix store) while each request writes its own tail into
blocks of its own. ``offset = num_tokens - physical_len`` is what later tokens subtract from their
logical position to find their physical slot; their RoPE position stays logical.

An *online* compaction (a request's KV reached its ceiling, ``am_max_kv_tokens``) uses the same fields in
physical coordinates of a cache that may already be compacted: ``base_offset`` is the request's offset
before it, the span ``[keep_first, span_end)`` may hold compacted entries with β (and −inf padding, which
is dropped), the raw tail is the protected recent window, and nothing is padded or shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_padding(entries: int, block_size: int) -> int:
    """Empty slots that complete the last block of ``entries``: the compacted prefix is whole blocks."""
    return cdiv(entries, block_size) * block_size - entries


@dataclass(frozen=True)
class CompactionLayout:
    """Where the compacted span lies and how long the request is physically afterwards."""

    num_tokens: int  # KV entries that exist before the compaction (logical length)
    keep_first: int
    span_end: int  # end of the compacted span (exclusive), logical, block-aligned
    target: int  # entries the span is compacted to
    pad: int = 0  # β = -inf entries that complete the last compacted block
    # Online re-compaction at a ceiling: the source is physical and may carry β (never shared).
    online: bool = False
    base_offset: int = 0  # logical - physical length of the source

    @property
    def span_tokens(self) -> int:
        return self.span_end - self.keep_first

    @property
    def tail_tokens(self) -> int:
        return self.num_tokens - self.span_end

    @property
    def prefix_physical_len(self) -> int:
        """Physical entries of the compacted prefix (a whole number of blocks)."""
        return self.keep_first + self.target + self.pad

    @property
    def physical_len(self) -> int:
        return self.prefix_physical_len + self.tail_tokens

    @property
    def offset(self) -> int:
        return self.base_offset + self.num_tokens - self.physical_len


@dataclass(frozen=True)
class CompactionJob:
    """One request's compaction, shipped with the step that completes its prefill (or reaches its KV
    ceiling) and run by every worker in layer slices over the following steps (``StepPlan.slices``)
    while the request is held out of scheduling. Workers read KV from ``src_block_ids`` and write the
    compacted layout into the fresh ``dst_block_ids`` (never in place: the source blocks stay valid
    prefix-cache entries, and stay the request's own until the last slice is booked)."""

    req_id: str
    layout: CompactionLayout
    src_block_ids: tuple[int, ...]
    dst_block_ids: tuple[int, ...]
    method: str
    queries: str
    chunk_tokens: int | None
    options: dict[str, Any] = field(default_factory=dict)
    # Test-only fault to inject on the worker (see FAULT_INJECTION_ENV); None in production.
    fault: str | None = None
    # Non-uniform budgets: entries per (layer, KV head); the layout's target is their maximum.
    head_targets: tuple[tuple[int, ...], ...] | None = None
    # Unique per scheduler: a result is booked only against the job it came from, never against a later
    # job of the same request (a preempted request compacts again in its next life).
    job_id: int = 0


#: When set to 1 in the server's environment, a request's ``extra_args["attnmatch_fault"]`` (one of
#: FAULTS) makes its compaction fail on the worker: how the tests prove that failures are contained.
FAULT_INJECTION_ENV = "VLLM_ATTNMATCH_FAULT_INJECTION"
FAULTS = ("solver", "nonfinite", "oom", "solver_on_last_rank")  # the last: one tensor-parallel rank fails


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
    # req_id -> keep only the newest n captured rows (online requests: a bounded ring of queries)
    capture_limit: dict[str, int] = field(default_factory=dict)
    # req_id -> the leading blocks a request scheduled in this step holds through its compacted-prefix
    # hit: their β is valid and kept; every other block handed out this step gets β = 0
    preserve_bias: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # req_id -> layers of its in-flight job to run after this step's forward (ALL_LAYERS: the rest). The
    # scheduler hands out one budget per step shared by all jobs (oldest first): a job absent here runs
    # nothing this step.
    # A job shipped in ``jobs`` runs no layer on its first step; it ends (and reports its result) on the
    # step its last layer runs. Every rank gets the same counts, so every rank ends a job on the same step.
    slices: dict[str, int] = field(default_factory=dict)
    # requests whose in-flight job and captured queries the workers must drop (preempted, aborted, failed)
    cancel: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not (
            self.jobs or self.swaps or self.offsets or self.capture_stride or self.preserve_bias or self.slices
            or self.cancel
        )


#: ``StepPlan.slices`` value that runs every remaining layer of a job.
ALL_LAYERS = 1 << 30


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
    query_seconds: float = 0.0  # producing synthetic reference queries (repeat / self_study), included in seconds
    query_source: str = "context"  # the source actually used (a synthetic one falls back to context on error)
    timings: dict = field(default_factory=dict)  # seconds per component (gather, scoring, beta, values, write, …)
    job_id: int = 0  # CompactionJob.job_id of the job this result is of


SCHEDULER_OUTPUT_ATTR = "attnmatch_plan"
RUNNER_OUTPUT_ATTR = "attnmatch_results"
