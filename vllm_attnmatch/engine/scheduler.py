"""Scheduler side of the plugin (EngineCore process): decides, plans and books compactions.

Per request: on the step that completes its prefill, plan a :class:`CompactionJob` (fresh destination
blocks, never in place) and ship it on the ``SchedulerOutput``; when the step's output comes back, swap
the request's blocks for the compacted ones and free the sources, or, if the worker failed, free the
destinations and serve the request uncompacted. Requests without ``am_*`` keys (and no server default)
are never touched.

Online mode (``am_max_kv_tokens``): whenever a request's physical KV reaches its ceiling — during decode,
or in a prefill chunk, which is cut there — everything but the sinks and a protected recent window is
re-compacted to ``online_ratio`` of its size, β-aware, and the request goes on at logical positions.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_attnmatch import __version__
from vllm_attnmatch.config import (
    ConfigError,
    EffectiveParams,
    ServerConfig,
    effective_params,
    parse_request_params,
    server_config_from,
)
from vllm_attnmatch.engine.head_budgets import HeadBudgetPlan
from vllm_attnmatch.engine.jobs import (
    FAULT_INJECTION_ENV,
    FAULTS,
    RUNNER_OUTPUT_ATTR,
    SCHEDULER_OUTPUT_ATTR,
    CompactionJob,
    CompactionLayout,
    CompactionResult,
    StepPlan,
    cdiv,
    layout_for_span,
    plan_layout,
    plan_online_layout,
    widen_layout,
)
from vllm_attnmatch.engine.kv_manager import AttnMatchFullAttentionManager, register_kv_cache_spec
from vllm_attnmatch.engine.prefix_store import CompactedPrefixStore
from vllm_attnmatch.metrics import CompactionStats

logger = init_logger("vllm.attnmatch.scheduler")


@dataclass
class RequestCompaction:
    """Plugin state of one compacting request."""

    params: EffectiveParams
    layout: CompactionLayout | None  # prefill compaction (None: online only)
    # num_preemptions when the current compaction was applied (None: not compacted in this life).
    compacted_in_life: int | None = None
    pending: CompactionJob | None = None
    prefix_key: bytes | None = None
    online_count: int = 0  # online compactions applied so far (all lives)
    online_stopped: bool = False  # limit reached, failed, or the ceiling leaves nothing to compact
    online_retry_at: int = 0  # physical length at which to retry after a lack of free blocks
    peak_physical: int = 0  # most KV entries the request held after any step (reported at the end)

    def in_prefill_phase(self, computed_before_step: int) -> bool:
        """The prompt prefix is still to be compacted (online compaction waits for it)."""
        return self.layout is not None and self.compacted_in_life is None and computed_before_step < self.layout.span_end


class AttnMatchScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        register_kv_cache_spec()  # before super() builds the KV-cache coordinator
        super().__init__(vllm_config, *args, **kwargs)
        self.attnmatch: ServerConfig = server_config_from(vllm_config.additional_config) or ServerConfig()
        managers = self.kv_cache_manager.coordinator.single_type_managers
        self._am_managers = [m for m in managers if isinstance(m, AttnMatchFullAttentionManager)]
        if len(self._am_managers) != 1 or len(managers) != 1:
            raise RuntimeError(
                "vllm-attnmatch supports models with one full-attention KV-cache group; got managers "
                + ", ".join(type(m).__name__ for m in managers)
            )
        self._am_requests: dict[str, RequestCompaction] = {}
        self._am_swaps: dict[str, tuple[int, ...]] = {}
        self._am_pending_jobs: dict[str, tuple[CompactionJob, list]] = {}
        self._am_hit_block_ids: list[int] = []
        self._am_store: CompactedPrefixStore | None = None
        if self.kv_cache_manager.enable_caching:
            self._am_store = CompactedPrefixStore(
                self.kv_cache_manager.block_pool,
                self.block_size,
                self.am_manager.kv_cache_group_id,
                salt=f"{vllm_config.model_config.model}|{__version__}|{self.attnmatch.summary()}",
            )
        self._am_head_plan: HeadBudgetPlan | None = None
        if self.attnmatch.head_budgets:
            model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
            self._am_head_plan = HeadBudgetPlan(
                self.attnmatch.head_budgets,
                model_config.get_num_layers(parallel),
                model_config.get_num_kv_heads(parallel),
                self.attnmatch.head_budget_max_factor,
            )
        engine_index = getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0
        self.am_stats = CompactionStats(engine_index)
        self._publish_pool_stats()
        logger.info(
            "vllm-attnmatch %s active (engine core): %s; block_size=%d",
            __version__,
            self.attnmatch.summary(),
            self.block_size,
        )

    @property
    def am_manager(self) -> AttnMatchFullAttentionManager:
        return self._am_managers[0]

    # -- admission ---------------------------------------------------------------------------------

    def add_request(self, request) -> None:
        params = self._params_for(request)
        layout = None
        if params is not None and params.compacts_prefill:
            layout = plan_layout(
                num_tokens=None,
                prompt_tokens=request.num_prompt_tokens,
                keep_first=params.keep_first,
                keep_last=params.keep_last,
                ratio=params.ratio,
                target_tokens=params.target_tokens,
                min_span_tokens=self.attnmatch.min_prompt_tokens,
                block_size=self.block_size,
            )
            if layout is None:
                self.am_stats.add("skipped")  # too short to compact: served exactly as stock vLLM
            else:
                layout = self._with_head_budgets(layout)
                # Reference queries come from the prefill: every prefix token must be computed here
                # (or the whole compacted prefix found in the store).
                request.skip_reading_prefix_cache = True
        if layout is not None or (params is not None and params.max_kv_tokens is not None):
            self._am_requests[request.request_id] = RequestCompaction(params, layout)
        super().add_request(request)

    def _params_for(self, request) -> EffectiveParams | None:
        sampling = request.sampling_params
        try:
            request_params = parse_request_params(sampling.extra_args if sampling is not None else None)
        except ConfigError as exc:  # the front end validates; reaching here means an offline caller
            logger.warning("request %s: %s; served uncompacted", request.request_id, exc)
            return None
        return effective_params(self.attnmatch, request_params)

    def _get_local_prefix_cache_hit(self, request):
        """Compacting requests look for a stored compacted prefix instead of token-hash hits (they need
        every prefix token's query if they compact themselves)."""
        state = self._am_requests.get(request.request_id)
        if state is not None and state.layout is None:
            return self._prefix_hit_below_ceiling(request, state)
        if state is None or self._am_store is None:
            return super()._get_local_prefix_cache_hit(request)
        self.am_manager.offsets.pop(request.request_id, None)
        state.compacted_in_life = None
        state.prefix_key = self._am_store.prefix_key(request, state.layout, state.params.cache_key())
        hit = self._find_stored_prefix(request, state)
        if hit is None:
            self.am_stats.add("prefix_misses")
            return super()._get_local_prefix_cache_hit(request)  # empty: reads are skipped
        layout, blocks = hit
        self.am_stats.add("prefix_hits")
        self.am_stats.add("prefill_tokens_saved", layout.span_end)
        self.am_manager.offsets[request.request_id] = layout.offset
        state.compacted_in_life = request.num_preemptions
        self._am_hit_block_ids.extend(b.block_id for b in blocks)
        return self.kv_cache_manager.create_kv_cache_blocks((blocks,)), layout.span_end, 0, False

    def _prefix_hit_below_ceiling(self, request, state: RequestCompaction):
        """An online request reuses ordinary cached blocks only below its ceiling, so that its first
        prefill chunk can still stop at the ceiling and compact there."""
        hit, num_tokens, boundary, flag = super()._get_local_prefix_cache_hit(request)
        cap = (state.params.max_kv_tokens - 1) // self.block_size * self.block_size
        if num_tokens <= cap:
            return hit, num_tokens, boundary, flag
        blocks = hit.blocks[0][: cap // self.block_size]
        return self.kv_cache_manager.create_kv_cache_blocks((blocks,)), cap, min(boundary, cap), flag

    def _find_stored_prefix(self, request, state: RequestCompaction):
        """The longest stored compaction of a block-aligned prefix of this prompt, with this request's
        parameters and a span no longer than its own: questions of different lengths after the same
        document still share the document's compaction."""
        params, own = state.params, state.layout
        min_end = own.keep_first + max(1, self.attnmatch.min_prompt_tokens)
        for span_end in range(own.span_end, min_end - 1, -self.block_size):
            layout = own if span_end == own.span_end else self._with_head_budgets(
                layout_for_span(span_end, own.keep_first, params.ratio, params.target_tokens, self.block_size)
            )
            key = state.prefix_key if layout is own else self._am_store.prefix_key(request, layout, params.cache_key())
            if key is None:
                continue
            blocks = self._am_store.lookup(key, layout.prefix_physical_len // self.block_size)
            if blocks is not None:
                return layout, blocks
        return None

    def _with_head_budgets(self, layout: CompactionLayout) -> CompactionLayout:
        """Non-uniform head budgets need as many slots as the largest head budget."""
        if self._am_head_plan is None:
            return layout
        targets = self._am_head_plan.targets(layout.span_tokens, layout.target)
        return widen_layout(layout, max(max(row) for row in targets), self.block_size)

    # -- planning ----------------------------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        plan = StepPlan(swaps=self._am_swaps, preserve_bias=self._am_hit_block_ids)
        self._am_swaps = {}
        self._am_hit_block_ids = []
        for req_id in list(output.num_scheduled_tokens):
            state = self._am_requests.get(req_id)
            if state is None:
                continue
            request = self.requests[req_id]
            if state.compacted_in_life is not None and state.compacted_in_life != request.num_preemptions:
                state.compacted_in_life = None  # preempted: the compaction died with its blocks
            if state.pending is None:
                computed_before = request.num_computed_tokens - output.num_scheduled_tokens[req_id]
                if state.in_prefill_phase(computed_before):
                    self._schedule_prefill_compaction(output, plan, request, state)
                elif state.params.max_kv_tokens is not None and not state.online_stopped:
                    self._schedule_online_compaction(output, plan, request, state)
            offset = self.am_manager.offsets.get(req_id)
            if offset is not None:
                plan.offsets[req_id] = offset
        if not plan.is_empty:
            setattr(output, SCHEDULER_OUTPUT_ATTR, plan)
        return output

    def _schedule_prefill_compaction(self, output, plan: StepPlan, request, state: RequestCompaction) -> None:
        span_end = state.layout.span_end
        self._stop_prefill_at(output, request, span_end)
        plan.capture_stride[request.request_id] = max(1, math.ceil(span_end / self.attnmatch.max_query_tokens))
        if request.num_computed_tokens == span_end:
            self._plan_job(request, state, state.layout, plan)

    def _schedule_online_compaction(self, output, plan: StepPlan, request, state: RequestCompaction) -> None:
        """Capture this request's queries (a bounded ring) and, at its ceiling, plan a re-compaction."""
        req_id = request.request_id
        limit = self.attnmatch.online_query_tokens
        scheduled = output.num_scheduled_tokens[req_id]
        plan.capture_stride[req_id] = 1 if scheduled == 1 else max(1, math.ceil(request.num_tokens / limit))
        plan.capture_limit[req_id] = limit
        offset = self.am_manager.offsets.get(req_id, 0)
        ceiling = max(state.params.max_kv_tokens, state.online_retry_at)
        physical = request.num_computed_tokens - offset
        if physical > ceiling and physical - scheduled < ceiling:  # a prefill chunk stops at the ceiling
            self._stop_prefill_at(output, request, ceiling + offset)
            physical = ceiling
        state.peak_physical = max(state.peak_physical, physical)
        if physical < ceiling:
            return
        limit_count = self.attnmatch.online_max_compactions
        if limit_count is not None and state.online_count >= limit_count:
            state.online_stopped = True
            return
        layout = plan_online_layout(
            physical_tokens=physical,
            base_offset=offset,
            keep_first=state.params.keep_first,
            recent_tokens=self.attnmatch.online_recent_tokens,
            ratio=self.attnmatch.online_ratio,
            min_span_tokens=self.attnmatch.min_prompt_tokens,
        )
        if layout is None:
            logger.warning(
                "request %s: a KV ceiling of %d leaves nothing to compact after keep_first=%d and "
                "online_recent_tokens=%d; it grows past the ceiling",
                req_id, state.params.max_kv_tokens, state.params.keep_first, self.attnmatch.online_recent_tokens,
            )
            self.am_stats.add("skipped")
            state.online_stopped = True
            return
        if self._plan_job(request, state, layout, plan) is None:
            state.online_retry_at = physical + self.block_size  # no free blocks now: try a block later

    def _stop_prefill_at(self, output, request, span_end: int) -> None:
        """End this step's chunk of the request at the compacted span's end, so that the rest of the
        prompt is prefilled over the compacted prefix: exactly what a later request that reuses the
        stored prefix computes."""
        excess = request.num_computed_tokens - span_end
        if excess <= 0:
            return
        output.num_scheduled_tokens[request.request_id] -= excess
        output.total_num_scheduled_tokens -= excess
        request.num_computed_tokens -= excess
        request.num_in_flight_tokens -= excess
        request.is_prefill_chunk = True
        self._inflight_prefills.add(request)
        self._uncache_unwritten_blocks(request)

    def _uncache_unwritten_blocks(self, request) -> None:
        """vLLM registers a chunk's full blocks in the prefix cache when it allocates them, before the
        forward writes them. A chunk cut short leaves blocks registered that this step does not write;
        if the compaction then frees them, still hashed, a later request with the same prefix would
        read them as a prefix hit. Unregister them (vLLM registers them again once they are written)."""
        manager, req_id = self.am_manager, request.request_id
        if req_id in manager.offsets:
            return  # compacted: nothing of it is registered under token hashes
        written = request.num_computed_tokens // self.block_size
        registered = manager.num_cached_block.get(req_id, 0)
        if registered <= written:
            return
        unwritten = manager.req_to_blocks[req_id][written:registered]
        self.kv_cache_manager.block_pool.evict_blocks({block.block_id for block in unwritten})
        manager.num_cached_block[req_id] = written

    def _plan_job(self, request, state: RequestCompaction, layout: CompactionLayout, plan: StepPlan):
        """Allocate the destination blocks and ship the job on this step's plan (None: no free blocks)."""
        params = state.params
        pool = self.kv_cache_manager.block_pool
        num_dst = cdiv(layout.physical_len, self.block_size)
        if pool.get_num_free_blocks() < num_dst:
            logger.info("request %s: no free blocks for compaction; not compacted now", request.request_id)
            self.am_stats.add("skipped")
            return None
        dst = pool.get_new_blocks(num_dst)
        job = CompactionJob(
            req_id=request.request_id,
            layout=layout,
            src_block_ids=tuple(self.kv_cache_manager.get_block_ids(request.request_id)[0]),
            dst_block_ids=tuple(b.block_id for b in dst),
            method=params.method,
            queries=params.queries,
            chunk_tokens=params.chunk_tokens,
            options=dict(self.attnmatch.algorithm),
            fault=self._injected_fault(request),
            head_targets=self._head_targets(state, layout),
        )
        self._am_pending_jobs[request.request_id] = (job, dst)
        state.pending = job
        plan.jobs.append(job)
        return job

    def _head_targets(self, state: RequestCompaction, layout: CompactionLayout):
        if self._am_head_plan is None or layout.online:
            return None  # online re-compaction stays uniform
        own = state.layout
        uniform = layout_for_span(own.span_end, own.keep_first, state.params.ratio, state.params.target_tokens, self.block_size)
        return self._am_head_plan.targets(uniform.span_tokens, uniform.target)

    @staticmethod
    def _injected_fault(request) -> str | None:
        if os.environ.get(FAULT_INJECTION_ENV) != "1":
            return None
        fault = (request.sampling_params.extra_args or {}).get("attnmatch_fault")
        return fault if fault in FAULTS else None

    # -- booking -----------------------------------------------------------------------------------

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        plan: StepPlan | None = getattr(scheduler_output, SCHEDULER_OUTPUT_ATTR, None)
        if plan is not None and plan.jobs:
            results = {r.req_id: r for r in getattr(model_runner_output, RUNNER_OUTPUT_ATTR, None) or ()}
            for job in plan.jobs:
                self._book(job, results.get(job.req_id))
        self._publish_pool_stats()
        return outputs

    def _publish_pool_stats(self) -> None:
        pool = self.kv_cache_manager.block_pool
        self.am_stats.set("kv_free_blocks", pool.get_num_free_blocks())
        self.am_stats.set("kv_total_blocks", pool.num_gpu_blocks - 1)  # minus the null block
        self.am_stats.flush()

    def _book(self, job: CompactionJob, result: CompactionResult | None) -> None:
        _, dst = self._am_pending_jobs.pop(job.req_id)
        state = self._am_requests.get(job.req_id)
        request = self.requests.get(job.req_id)
        if state is not None:
            state.pending = None
        alive = request is not None and not request.is_finished() and state is not None
        if result is None or not result.ok or not alive:
            self.kv_cache_manager.block_pool.free_blocks(dst)
            if result is None or not result.ok:
                if state is not None and job.layout.online:
                    state.online_stopped = True  # no retry loop: it grows past its ceiling
                self.am_stats.add("failures")
                logger.warning(
                    "request %s: compaction failed (%s); served uncompacted",
                    job.req_id,
                    result.error if result is not None else "no result from the worker",
                )
            return
        old = self.am_manager.replace_blocks(job.req_id, dst, job.layout.offset)
        state.compacted_in_life = request.num_preemptions
        if job.layout.online:
            state.online_count += 1
            state.online_retry_at = 0
        else:
            self._publish_prefix(state, job, dst)
        self._am_swaps[job.req_id] = job.dst_block_ids
        stats = self.am_stats
        stats.add("compactions")
        stats.add("online_compactions" if job.layout.online else "prefill_compactions")
        stats.add("tokens_before", job.layout.num_tokens)
        stats.add("tokens_after", job.layout.physical_len)
        stats.add("compaction_seconds", result.seconds)
        stats.add("reference_query_seconds", result.query_seconds)
        stats.add("blocks_freed", len(old) - len(dst))
        if self.attnmatch.log_compactions:
            logger.info(
                "compacted request %s%s: T=%d -> t=%d (span %d -> %d, method %s, queries %s), %.3f s, "
                "fit error %.4g, blocks %d -> %d",
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
            )

    def _publish_prefix(self, state: RequestCompaction, job: CompactionJob, dst: list) -> None:
        if self._am_store is None or state.prefix_key is None:
            return
        num_blocks = job.layout.prefix_physical_len // self.block_size
        if self._am_store.lookup(state.prefix_key, num_blocks) is None:
            self._am_store.store(state.prefix_key, dst[:num_blocks])

    def _free_request(self, request, *args, **kwargs):
        state = self._am_requests.pop(request.request_id, None)
        if state is not None and state.params.max_kv_tokens is not None and self.attnmatch.log_compactions:
            logger.info(
                "request %s finished: %d tokens, KV ceiling %d, peak KV entries %d, %d online compactions",
                request.request_id,
                request.num_computed_tokens,
                state.params.max_kv_tokens,
                state.peak_physical,
                state.online_count,
            )
        return super()._free_request(request, *args, **kwargs)
