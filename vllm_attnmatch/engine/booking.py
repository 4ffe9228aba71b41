"""Booking: what the scheduler records when a compaction ends — applied, failed, skipped or cancelled.

Applied: the request's blocks become the job's destination blocks, the source blocks go back to the pool
(they keep their token hashes: still valid *uncompacted* prefix-cache entries), a prompt compaction is
published in the compacted-prefix store, and the counters and the log line are written. Failed or
cancelled: the destination blocks go back to the pool and the request is served uncompacted. Every
outcome moves the request's :class:`~vllm_attnmatch.engine.request_state.RequestCompaction` through its
state machine. No decision about *when* to compact lives here.
"""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_attnmatch.config import ServerConfig
from vllm_attnmatch.contract.jobs import CompactionJob, CompactionResult
from vllm_attnmatch.engine.allocation import DestinationAllocator
from vllm_attnmatch.engine.kv_manager import AttnMatchFullAttentionManager
from vllm_attnmatch.engine.prefix_store import CompactedPrefixStore
from vllm_attnmatch.engine.request_state import CompactionPhase, RequestCompaction
from vllm_attnmatch.ipc.metrics import CompactionStats

logger = init_logger("vllm.attnmatch.scheduler")


class Booking:
    def __init__(
        self,
        settings: ServerConfig,
        stats: CompactionStats,
        manager: AttnMatchFullAttentionManager,
        allocator: DestinationAllocator,
        store: CompactedPrefixStore | None,
        block_size: int,
    ) -> None:
        self.settings = settings
        self.stats = stats
        self.manager = manager
        self.allocator = allocator
        self.store = store
        self.block_size = block_size

    def skip(self, req_id: str, state: RequestCompaction | None, why: str) -> None:
        """Not attempted (too short, no free blocks, nothing to compact): served uncompacted."""
        self.stats.add("skipped")
        if why:
            logger.info("request %s: %s; not compacted now", req_id, why)
        if state is not None and state.phase is CompactionPhase.PREFILLING:
            state.settle(CompactionPhase.SKIPPED)

    def cancel(self, state: RequestCompaction) -> None:
        """The request was preempted or aborted with a job in flight: give its destination back."""
        if state.phase is CompactionPhase.IN_FLIGHT and state.dst_holder is not None:
            self.allocator.release(state.dst_holder)
            logger.info("request %s: compaction cancelled in flight; its destination blocks are freed", state.job.req_id)

    def book(self, job: CompactionJob, result: CompactionResult | None, state: RequestCompaction | None, request):
        """Record the outcome of a job whose last layer slice ran this step. Returns the new block ids
        to swap in on the workers, or None (failed, or the request is gone)."""
        stale = result is not None and result.job_id != job.job_id  # of an earlier, cancelled job
        if state is None or state.job is not job or stale or state.phase is not CompactionPhase.IN_FLIGHT:
            return None  # cancelled (preempted or aborted) after its last slice was scheduled
        if request is None or request.is_finished():
            self.allocator.release(state.dst_holder)
            state.settle(CompactionPhase.FAILED)
            return None
        if result is None or not result.ok:
            self.allocator.release(state.dst_holder)
            state.settle(CompactionPhase.FAILED)
            self.stats.add("failures")
            logger.warning(
                "request %s: compaction failed (%s); served uncompacted",
                job.req_id,
                result.error if result is not None else "no result from the worker",
            )
            return None
        old, dst = self.manager.adopt_blocks(job.req_id, state.dst_holder, job.layout.offset)
        if job.layout.online:
            state.online_count += 1
            state.online_retry_at = 0
        else:
            self._publish_prefix(state, job, dst)
        state.settle(CompactionPhase.APPLIED)
        self._count(job, result, len(old) - len(dst))
        if self.settings.log_compactions:
            logger.info(
                "compacted request %s%s: T=%d -> t=%d (span %d -> %d, method %s, queries %s), %.3f s, "
                "fit error %.4g, blocks %d -> %d%s",
                job.req_id,
                f" (online #{state.online_count}, logical length {request.num_computed_tokens})" if job.layout.online else "",
                job.layout.num_tokens,
                job.layout.physical_len,
                job.layout.span_tokens,
                job.layout.target,
                job.method,
                result.query_source if not job.layout.online else "context ring",
                result.seconds,
                result.fit_error,
                len(old),
                len(dst),
                (" (" + ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()) + ")") if result.timings else "",
            )
        return tuple(b.block_id for b in dst)

    def _count(self, job: CompactionJob, result: CompactionResult, blocks_freed: int) -> None:
        stats = self.stats
        stats.add("compactions")
        stats.add("online_compactions" if job.layout.online else "prefill_compactions")
        stats.add("tokens_before", job.layout.num_tokens)
        stats.add("tokens_after", job.layout.physical_len)
        stats.add("compaction_seconds", result.seconds)
        stats.add("reference_query_seconds", result.query_seconds)
        stats.add("blocks_freed", blocks_freed)

    def _publish_prefix(self, state: RequestCompaction, job: CompactionJob, dst: list) -> None:
        if self.store is None or state.prefix_key is None:
            return
        num_blocks = job.layout.prefix_physical_len // self.block_size
        if self.store.lookup(state.prefix_key, num_blocks) is None:  # store() evicts any partial older one
            self.store.store(state.prefix_key, dst[:num_blocks])
