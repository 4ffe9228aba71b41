"""A compacting request's life on the scheduler side, as an explicit state machine.

vLLM tells a request's life by one enum (``RequestStatus``) with its transitions in one place; a request
the plugin compacts carries a :class:`CompactionPhase` the same way, so the scheduler asks "what phase is
it in" rather than combining flags. Every transition goes through :meth:`RequestCompaction.move`, which
refuses the ones not listed in ``_ALLOWED``. No vLLM import.

::

    PREFILLING ──plan──▶ IN_FLIGHT ──ok──▶ APPLIED ─(online)─▶ WATCHING
        │                    │ └──fail──▶ FAILED  ─(online)─▶ WATCHING
        ├──hit──▶ APPLIED    └─cancel (preempted / aborted)─▶ start phase
        └──no blocks──▶ SKIPPED ─(online)─▶ WATCHING
    WATCHING ──ceiling──▶ IN_FLIGHT ──ok──▶ WATCHING
        └──limit / nothing to compact / failure──▶ STOPPED

Short of destination blocks while other jobs are in flight, a PREFILLING request stays PREFILLING with
``awaiting_blocks`` set (held out of the batch, retried each step) instead of being SKIPPED: those jobs
free most of their raw blocks when they finish.

A preemption sends any phase back to its start phase (``PREFILLING`` if the prompt compacts,
``WATCHING`` otherwise): the compaction died with the blocks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vllm_attnmatch.config import EffectiveParams
from vllm_attnmatch.contract.jobs import CompactionJob, CompactionLayout


class CompactionPhase(enum.Enum):
    PREFILLING = "prefilling"  # the prompt prefix to compact is still being prefilled
    IN_FLIGHT = "in_flight"  # a job runs on the workers (in layer slices); the request is held out
    APPLIED = "applied"  # compacted in this life (no online ceiling to watch)
    FAILED = "failed"  # the job failed: served uncompacted
    SKIPPED = "skipped"  # not attempted (no free blocks): served uncompacted
    WATCHING = "watching"  # online: grows toward its KV ceiling, then re-compacts
    STOPPED = "stopped"  # online: limit reached, failed, or nothing left to compact


_START = {CompactionPhase.PREFILLING, CompactionPhase.WATCHING}
_ALLOWED: dict[CompactionPhase, frozenset[CompactionPhase]] = {
    CompactionPhase.PREFILLING: frozenset(
        {CompactionPhase.IN_FLIGHT, CompactionPhase.APPLIED, CompactionPhase.SKIPPED, CompactionPhase.WATCHING}
    ),
    CompactionPhase.IN_FLIGHT: frozenset(
        {CompactionPhase.APPLIED, CompactionPhase.FAILED, CompactionPhase.WATCHING, CompactionPhase.STOPPED}
    ),
    CompactionPhase.APPLIED: frozenset({CompactionPhase.WATCHING}),
    CompactionPhase.FAILED: frozenset({CompactionPhase.WATCHING}),
    CompactionPhase.SKIPPED: frozenset({CompactionPhase.WATCHING}),
    CompactionPhase.WATCHING: frozenset({CompactionPhase.IN_FLIGHT, CompactionPhase.STOPPED}),
    CompactionPhase.STOPPED: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class RequestCompaction:
    """Plugin state of one request that compacts (its prompt, or online at a KV ceiling)."""

    params: EffectiveParams
    layout: CompactionLayout | None  # prefill compaction (None: online only)
    phase: CompactionPhase = CompactionPhase.PREFILLING
    job: CompactionJob | None = None  # the job in flight (IN_FLIGHT only)
    dst_holder: str | None = None  # who holds the job's destination blocks in the manager
    layers_planned: int = 0  # layers of the job in flight handed out in step plans so far
    prefix_key: bytes | None = None
    # Compacted-prefix lookup of this life: ((layout, key) of the hit, or None for a miss); looked up once.
    lookup_done: bool = False
    lookup_hit: tuple[CompactionLayout, bytes] | None = None
    lookup_counted: bool = False  # the hit or miss of this life is in the counters
    online_count: int = 0  # online compactions applied so far (all lives)
    online_retry_at: int = 0  # physical length at which to retry after a lack of free blocks
    # Prefilled to its span's end, its job waits for destination blocks that jobs in flight will free:
    # held out of the batch (0 tokens) and retried each step, its captured queries kept.
    awaiting_blocks: bool = False
    capture_refused: bool = False  # refused its capture in some life: counted once, however often refused
    peak_physical: int = 0  # most KV entries the request held after any step (reported at the end)

    def __post_init__(self) -> None:
        self.phase = self.start_phase

    @property
    def online(self) -> bool:
        return self.params is not None and self.params.max_kv_tokens is not None

    @property
    def start_phase(self) -> CompactionPhase:
        return CompactionPhase.PREFILLING if self.layout is not None else CompactionPhase.WATCHING

    def move(self, to: CompactionPhase) -> None:
        """The one place a phase changes (preemption aside: see :meth:`restart`)."""
        if to not in _ALLOWED[self.phase]:
            raise IllegalTransition(f"compaction phase {self.phase.value} -> {to.value}")
        self.phase = to
        self.awaiting_blocks = False
        if to is not CompactionPhase.IN_FLIGHT:
            self.job = None
            self.dst_holder = None
        self.layers_planned = 0  # a new job, or none: no layer of it has run

    def settle(self, outcome: CompactionPhase) -> None:
        """End of a prefill compaction (APPLIED / FAILED / SKIPPED); an online request then watches its
        ceiling. End of an online one: back to watching, or STOPPED."""
        if self.phase is CompactionPhase.IN_FLIGHT and self.job is not None and self.job.layout.online:
            self.move(CompactionPhase.WATCHING if outcome is CompactionPhase.APPLIED else CompactionPhase.STOPPED)
            return
        self.move(outcome)
        if self.online:
            self.move(CompactionPhase.WATCHING)

    def restart(self) -> None:
        """Preempted: the blocks (and any compaction in them or in flight) are gone; start this life over."""
        self.phase = self.start_phase
        self.job = None
        self.dst_holder = None
        self.layers_planned = 0
        self.lookup_done = False
        self.lookup_hit = None
        self.lookup_counted = False
        self.online_retry_at = 0  # a retry point of the old life's physical length means nothing now
        self.awaiting_blocks = False

    @property
    def in_flight(self) -> bool:
        return self.phase is CompactionPhase.IN_FLIGHT

    @property
    def prefilling(self) -> bool:
        return self.phase is CompactionPhase.PREFILLING

    @property
    def watching(self) -> bool:
        return self.phase is CompactionPhase.WATCHING
