"""Scheduler side of the plugin (EngineCore process): the glue between vLLM's scheduler hooks and the
plugin's parts, one concern per module.

- ``admission``: does a request compact, with which layout; which stored compacted prefix it starts from
  (searched once per request life);
- ``chunking``: where a compacting request's chunk stops, clamped before allocation (vLLM's own hook);
- ``online``: when an ``am_max_kv_tokens`` request re-compacts;
- ``allocation``: the job's destination blocks, admitted beside vLLM's reservations;
- ``booking``: applied / failed / skipped / cancelled, counters, the compacted-prefix store;
- ``capture_budget``: the memory of captured reference queries, reserved per request before it captures;
- ``request_state``: each request's compaction phase (an explicit state machine).

A job is shipped on the ``SchedulerOutput`` of the step that completes the prefix (or reaches the
ceiling) and runs on the workers in layer slices over the next steps, while the request is held out of
scheduling and every other request keeps running; all jobs in flight share one budget of layers per step
(``compaction_layers_per_step``, or ``idle_layers_per_step`` when nothing else is scheduled). Its result comes back
on the step of its last slice and is booked then. Requests without ``am_*`` keys (and no server
default) are never touched.
"""

from __future__ import annotations

import itertools
import os

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_attnmatch import __version__
from vllm_attnmatch.config import ServerConfig, server_config_from
from vllm_attnmatch.contract.jobs import (
    ALL_LAYERS,
    FAULT_INJECTION_ENV,
    FAULTS,
    RUNNER_OUTPUT_ATTR,
    SCHEDULER_OUTPUT_ATTR,
    CompactionJob,
    CompactionLayout,
    StepPlan,
    cdiv,
)
from vllm_attnmatch.engine.admission import Admission
from vllm_attnmatch.engine.allocation import DestinationAllocator
from vllm_attnmatch.engine.booking import Booking
from vllm_attnmatch.engine.capture_budget import (
    MIB,
    ONLINE,
    PREFILL,
    CaptureBudget,
    CaptureShape,
    default_budget_bytes,
    online_rows,
    prefill_rows,
)
from vllm_attnmatch.engine.chunking import clamp_new_tokens, online_capture_stride, prefill_capture_stride
from vllm_attnmatch.engine.head_budgets import HeadBudgetPlan
from vllm_attnmatch.engine.kv_manager import AttnMatchFullAttentionManager, register_kv_cache_spec
from vllm_attnmatch.engine.online import hit_below_ceiling, online_layout
from vllm_attnmatch.engine.prefix_store import CompactedPrefixStore
from vllm_attnmatch.engine.request_state import CompactionPhase, RequestCompaction
from vllm_attnmatch.ipc.metrics import CompactionStats
from vllm_attnmatch.ipc.report import ReportRecorder

logger = init_logger("vllm.attnmatch.scheduler")


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
        self._am_cancel: list[str] = []
        self._am_job_ids = itertools.count(1)
        self._am_hits: dict[str, tuple[int, ...]] = {}  # this step's compacted-prefix hits, by request
        # The layers every worker compacts per job: those of the KV cache (the runner's own list).
        self._am_num_layers = sum(len(g.layer_names) for g in self.kv_cache_config.kv_cache_groups)
        engine_index = getattr(vllm_config.parallel_config, "data_parallel_rank", 0) or 0
        self.am_stats = CompactionStats(engine_index)
        store = None
        if self.kv_cache_manager.enable_caching:
            store = CompactedPrefixStore(
                self.kv_cache_manager.block_pool,
                self.block_size,
                self.am_manager.kv_cache_group_id,
                salt=f"{vllm_config.model_config.model}|{__version__}|{self.attnmatch.summary()}",
                pin_share=self.attnmatch.prefix_pin_share,
                stats=self.am_stats,
            )
        self._am_store = store
        head_plan = None
        if self.attnmatch.head_budgets:
            model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
            head_plan = HeadBudgetPlan(
                self.attnmatch.head_budgets,
                model_config.get_num_layers(parallel),
                model_config.get_total_num_kv_heads(),  # global heads: each TP rank takes its own rows
                self.attnmatch.head_budget_max_factor,
            )
        self.am_reports = ReportRecorder(self.attnmatch, self.block_size, engine_index)  # per-request reports
        self._am_capture = self._capture_budget(vllm_config)
        self._am_admission = Admission(self.attnmatch, self.block_size, store, head_plan)
        self._am_allocator = DestinationAllocator(self.kv_cache_manager, self.am_manager, self.block_size)
        self._am_booking = Booking(self.attnmatch, self.am_stats, self.am_manager, self._am_allocator, store, self.block_size)
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

    def _capture_budget(self, vllm_config) -> CaptureBudget:
        """The capture memory budget of this engine's devices, logged once."""
        model_config, parallel = vllm_config.model_config, vllm_config.parallel_config
        shape = CaptureShape(
            num_layers=model_config.get_num_layers(parallel),
            num_query_heads=model_config.get_num_attention_heads(parallel),  # this rank's heads
            head_size=model_config.get_head_size(),
            dtype_bytes=model_config.dtype.itemsize,
        )
        self._am_max_model_len = model_config.max_model_len
        configured = self.attnmatch.capture_budget_mib
        if configured is not None:
            limit, origin = int(configured * MIB), "capture_budget_mib"
        else:
            limit = default_budget_bytes(shape, self.attnmatch.max_query_tokens, self._am_max_model_len)
            origin = "default: 4 captures of min(max_query_tokens, max_model_len) rows"
        logger.info(
            "vllm-attnmatch capture budget %.1f MiB per device (%s); a captured row takes %d bytes "
            "(%d layers x %d query heads x %d x %d bytes + its position); compactions that do not fit are "
            "served uncompacted",
            limit / MIB, origin, shape.row_bytes, shape.num_layers, shape.num_query_heads, shape.head_size,
            shape.dtype_bytes,
        )
        return CaptureBudget(limit, shape)

    # -- admission (vLLM hooks) ---------------------------------------------------------------------

    def add_request(self, request) -> None:
        params = self._am_admission.params_for(request)
        layout = None
        if params is not None and params.compacts_prefill:
            layout = self._am_admission.prefill_layout(request, params)
            if layout is not None:
                # Reference queries come from the prefill: every prefix token must be computed here
                # (or the whole compacted prefix found in the store).
                request.skip_reading_prefix_cache = True
        is_new = request.request_id not in self.requests
        super().add_request(request)  # may refuse it (a duplicate id): then nothing of it is recorded
        if not is_new or self.requests.get(request.request_id) is not request:
            return  # a streaming session's next chunk: the request's own state and report stay
        if params is not None and params.compacts_prefill and layout is None:
            self._am_booking.skip(request.request_id, None, "")  # too short: served exactly as stock vLLM
        if layout is not None or (params is not None and params.max_kv_tokens is not None):
            self._am_requests[request.request_id] = RequestCompaction(params, layout)
        self.am_reports.admitted(request, params, layout)

    def _get_local_prefix_cache_hit(self, request):
        """Compacting requests look for a stored compacted prefix instead of token-hash hits (they need
        every prefix token's query if they compact themselves)."""
        state = self._am_requests.get(request.request_id)
        if state is not None and state.layout is None:
            hit, num_tokens, boundary, flag = super()._get_local_prefix_cache_hit(request)
            capped = hit_below_ceiling(hit.blocks[0], num_tokens, boundary, state, self.block_size)
            if capped is None:
                return hit, num_tokens, boundary, flag
            blocks, num_tokens, boundary = capped
            return self.kv_cache_manager.create_kv_cache_blocks((blocks,)), num_tokens, boundary, flag
        if state is None or self._am_store is None or not state.prefilling:
            return super()._get_local_prefix_cache_hit(request)
        self.am_manager.offsets.pop(request.request_id, None)
        found = self._am_admission.stored_prefix(request, state)
        if found is None:
            return super()._get_local_prefix_cache_hit(request)  # empty: reads are skipped
        layout, blocks = found
        self.am_manager.offsets[request.request_id] = layout.offset
        self._am_hits[request.request_id] = tuple(b.block_id for b in blocks)
        return self.kv_cache_manager.create_kv_cache_blocks((blocks,)), layout.span_end, 0, False

    def _reserve_prefill_lookahead(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """vLLM's last cap on a step's tokens before it allocates: compacting requests stop where they
        compact, and a request whose job is in flight is not scheduled (see ``chunking``)."""
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        state = self._am_requests.get(request.request_id)
        if state is None or num_new_tokens == 0:
            return num_new_tokens
        offset = self.am_manager.offsets.get(request.request_id, 0)
        return clamp_new_tokens(state, num_computed_tokens, num_new_tokens, offset)

    # -- planning ----------------------------------------------------------------------------------

    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        plan = StepPlan(swaps=self._am_swaps, preserve_bias=self._held_hits(output), cancel=self._am_cancel)
        self._am_swaps, self._am_hits, self._am_cancel = {}, {}, []
        self._plan_slices(output, plan)
        self._retry_awaiting(plan)
        self._release_captures()
        for req_id in list(output.num_scheduled_tokens):
            state = self._am_requests.get(req_id)
            if state is None:
                continue
            request = self.requests[req_id]
            if state.prefilling:
                self._admitted(request, state)
            if state.prefilling:
                self._reserve_capture(req_id, state)  # no room: served uncompacted (online: it watches)
            if state.prefilling:
                span_end = state.layout.span_end
                plan.capture_stride[req_id] = prefill_capture_stride(span_end, self.attnmatch.max_query_tokens)
                if request.num_computed_tokens == span_end:
                    self._plan_job(request, state, state.layout, plan)
            elif state.watching and self._reserve_capture(req_id, state):
                self._plan_online(output, plan, request, state)
            offset = self.am_manager.offsets.get(req_id)
            if offset is not None:
                plan.offsets[req_id] = offset
        if not plan.is_empty:
            setattr(output, SCHEDULER_OUTPUT_ATTR, plan)
        return output

    def _retry_awaiting(self, plan: StepPlan) -> None:
        """Ship the jobs that waited for destination blocks, oldest request first, as blocks come free."""
        for req_id, state in list(self._am_requests.items()):
            if state.awaiting_blocks and state.prefilling:
                self._plan_job(self.requests[req_id], state, state.layout, plan)

    def _held_hits(self, output) -> dict[str, tuple[int, ...]]:
        """The compacted-prefix blocks whose β survives this step: only those a request *scheduled in
        this step* holds from its hit. A request that was looked up but not admitted holds nothing (its
        hit blocks stay free, and the pool may hand them to another request fresh)."""
        held = {}
        for req_id, hit in self._am_hits.items():
            if req_id in output.num_scheduled_tokens:
                blocks = self.kv_cache_manager.get_block_ids(req_id)[0]
                if tuple(blocks[: len(hit)]) == hit:
                    held[req_id] = hit
        return held

    def _admitted(self, request, state: RequestCompaction) -> None:
        """First step of a prefilling request's life: count its compacted-prefix hit or miss once, and
        a hit means the prompt prefix is already compacted."""
        if self._am_store is None or state.lookup_counted or not state.lookup_done:
            return
        state.lookup_counted = True
        if state.lookup_hit is None:
            self.am_stats.add("prefix_misses")
            return
        layout, _ = state.lookup_hit
        self.am_stats.add("prefix_hits")
        self.am_stats.add("prefill_tokens_saved", layout.span_end)
        state.settle(CompactionPhase.APPLIED)
        self.am_reports.prefix_hit(request.request_id, layout)

    def _reserve_capture(self, req_id: str, state: RequestCompaction) -> bool:
        """Reserve the capture memory of a request about to capture (prefilling or watching); when it does
        not fit, its compaction is not attempted and its report says why. Before any worker allocates."""
        if state.prefilling:
            kind, rows = PREFILL, prefill_rows(state.layout.span_end, self.attnmatch.max_query_tokens)
        else:
            request = self.requests[req_id]
            kind, rows = ONLINE, online_rows(self.attnmatch.online_query_tokens, self._am_max_model_len,
                                             request.num_prompt_tokens + request.max_tokens)
        if self._am_capture.reserve(req_id, kind, rows):
            return True
        reason = self._am_capture.exhausted_reason(rows)
        if not state.capture_refused:  # a request, not an attempt: a preempted one refused again counts once
            state.capture_refused = True
            self.am_stats.add("capture_refused")
        if kind == PREFILL:
            self._am_booking.skip(req_id, state, reason)  # an online request then watches its ceiling
        else:
            self._am_booking.skip(req_id, None, reason)
            state.move(CompactionPhase.STOPPED)  # it grows past its ceiling
        self.am_reports.capture_refused(req_id, reason, online=kind == ONLINE)
        return False

    def _release_captures(self) -> None:
        """Give back the capture memory of requests that no longer hold captured queries: gone, settled,
        or a prompt compaction's reservation once the request watches its ceiling (it reserves its ring)."""
        for req_id, kind in self._am_capture.held().items():
            state = self._am_requests.get(req_id)
            holds = state is not None and (
                state.in_flight
                or (state.prefilling and kind == PREFILL)
                or (state.watching and kind == ONLINE)
            )
            if not holds:
                self._am_capture.release(req_id)

    def _plan_slices(self, output, plan: StepPlan) -> None:
        """Layers of the in-flight jobs to run after this step's forward: ONE budget for the step, shared
        by every job (``compaction_layers_per_step`` while other requests run; ``idle_layers_per_step``
        when nothing else is scheduled, a bounded chunk so that a request arriving meanwhile is scheduled
        at the next step), handed out oldest job first. Runs before this step ships new jobs: those start
        next step."""
        in_flight = sorted(
            ((state.job.job_id, req_id, state) for req_id, state in self._am_requests.items()
             if state.in_flight and state.job is not None),
            key=lambda item: item[0],
        )
        if not in_flight:
            return
        per_step = self.attnmatch.compaction_layers_per_step
        if per_step is None:  # no slicing: every job runs all its layers in this step
            for _, req_id, _ in in_flight:
                plan.slices[req_id] = ALL_LAYERS
            return
        busy = output.total_num_scheduled_tokens > 0
        burst = not busy or self._short_of_memory()
        budget = max(per_step, self.attnmatch.idle_layers_per_step) if burst else per_step
        for _, req_id, state in in_flight:
            if budget <= 0:
                break
            # A job whose result has not come back still has a layer to run, whatever the count says:
            # a job never stalls on a miscount of the workers' layers.
            left = max(1, self._am_num_layers - state.layers_planned)
            count = min(left, budget)
            plan.slices[req_id] = count
            state.layers_planned += count
            budget -= count

    def _short_of_memory(self) -> bool:
        """Whether the next waiting request (new or preempted) needs more KV blocks than are free. Jobs in
        flight hold their raw blocks until they finish and then free most of them, so under this pressure
        they get the idle budget: a compaction done sooner admits a waiting request sooner, and one held
        back keeps its raw blocks and drives vLLM to preempt."""
        if not self.waiting:
            return False
        head = self.waiting.peek_request()
        need = cdiv(head.num_tokens - head.num_computed_tokens, self.block_size)
        return self.kv_cache_manager.block_pool.get_num_free_blocks() < need

    def _plan_online(self, output, plan: StepPlan, request, state: RequestCompaction) -> None:
        """Capture this request's queries (a bounded ring) and, at its ceiling, plan a re-compaction."""
        req_id = request.request_id
        ring = self.attnmatch.online_query_tokens
        plan.capture_stride[req_id] = online_capture_stride(output.num_scheduled_tokens[req_id], request.num_tokens, ring)
        plan.capture_limit[req_id] = ring
        offset = self.am_manager.offsets.get(req_id, 0)
        layout, nothing_to_compact = online_layout(self.attnmatch, state, req_id, request.num_computed_tokens, offset)
        if nothing_to_compact:
            self._am_booking.skip(req_id, None, "")  # warned by online_layout
            self.am_reports.nothing_to_compact(req_id)
        if layout is None:
            return
        if self._plan_job(request, state, layout, plan) is None:
            state.online_retry_at = (request.num_computed_tokens - offset) + self.block_size  # a block later

    def _plan_job(self, request, state: RequestCompaction, layout: CompactionLayout, plan: StepPlan):
        """Reserve the destination blocks and ship the job on this step's plan (None: no free blocks)."""
        req_id = request.request_id
        # What other in-flight prefills still need (this request's own need shrinks when it compacts).
        reserved = sum(self._request_remaining_blocks(r) for r in self._inflight_prefills if r is not request)
        held = self._am_allocator.reserve(req_id, layout.physical_len, reserved)
        if held is None and not layout.online and any(s.in_flight for s in self._am_requests.values()):
            # Jobs in flight free most of their raw blocks when they finish: wait for them rather than
            # keep this request's whole raw prompt for the rest of its life.
            state.awaiting_blocks = True
            return None
        if held is None:
            self._am_booking.skip(req_id, state, "no free blocks for compaction")
            self.am_reports.no_free_blocks(req_id, layout.online)
            if not layout.online:
                self._am_cancel.append(req_id)  # its captured queries are of no use now: free them
            return None
        holder, dst = held
        params = state.params
        job = CompactionJob(
            req_id=req_id,
            layout=layout,
            src_block_ids=tuple(self.kv_cache_manager.get_block_ids(req_id)[0]),
            dst_block_ids=tuple(b.block_id for b in dst),
            method=params.method,
            queries=params.queries,
            chunk_tokens=params.chunk_tokens,
            options=self._algorithm_options(params.method),
            fault=self._injected_fault(request),
            head_targets=self._am_admission.head_targets(state, layout),
            job_id=next(self._am_job_ids),
        )
        state.move(CompactionPhase.IN_FLIGHT)
        state.job, state.dst_holder = job, holder
        plan.jobs.append(job)
        return job

    def _algorithm_options(self, method: str) -> dict:
        per_method = getattr(self.attnmatch, "algorithm_options", None)
        return dict(per_method(method)) if per_method is not None else dict(self.attnmatch.algorithm)

    @staticmethod
    def _injected_fault(request) -> str | None:
        if os.environ.get(FAULT_INJECTION_ENV) != "1":
            return None
        fault = (request.sampling_params.extra_args or {}).get("attnmatch_fault")
        return fault if fault in FAULTS else None

    # -- booking -----------------------------------------------------------------------------------

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        results = getattr(model_runner_output, RUNNER_OUTPUT_ATTR, None) or ()
        for result in results:
            state = self._am_requests.get(result.req_id)
            job = state.job if state is not None else None
            if job is None or result.job_id != job.job_id:
                continue  # cancelled meanwhile (its destination is already back in the pool), or of a job
                # of an earlier life: the job in flight now is not done
            swap = self._am_booking.book(job, result, state, self.requests.get(result.req_id))
            self.am_reports.booked(job, result, applied=swap is not None)
            if swap is not None:
                self._am_swaps[result.req_id] = swap
            else:
                self._am_cancel.append(result.req_id)  # failed: workers drop what they still hold
        self._publish_pool_stats()
        return outputs

    def _publish_pool_stats(self) -> None:
        pool = self.kv_cache_manager.block_pool
        self.am_stats.set("kv_free_blocks", pool.get_num_free_blocks())
        self.am_stats.set("kv_total_blocks", pool.num_gpu_blocks - 1)  # minus the null block
        self.am_stats.set("capture_budget_bytes", self._am_capture.limit)
        self.am_stats.set("capture_reserved_bytes", self._am_capture.used)
        self.am_stats.flush()
        self.am_reports.flush()  # before this step's outputs leave: a finished client finds its report

    # -- preemption, abort, finish -----------------------------------------------------------------

    def _preempt_request(self, request, *args, **kwargs):
        state = self._am_requests.get(request.request_id)
        if state is not None:
            logger.info(
                "request %s preempted in compaction phase %s: its blocks are freed, the compaction is redone "
                "(or a stored compacted prefix reused) when it resumes",
                request.request_id,
                state.phase.value,
            )
            self._am_booking.cancel(state)
            state.restart()  # the compaction (done or in flight) dies with the blocks
            self._am_cancel.append(request.request_id)
            self._am_capture.release(request.request_id)  # reserved again when it captures again
        return super()._preempt_request(request, *args, **kwargs)

    def _free_request(self, request, *args, **kwargs):
        state = self._am_requests.pop(request.request_id, None)
        self._am_capture.release(request.request_id)
        if state is not None:
            self._am_booking.cancel(state)
            if state.in_flight or state.awaiting_blocks:
                self._am_cancel.append(request.request_id)  # the workers drop its job or its captured queries
            if state.online and self.attnmatch.log_compactions:
                logger.info(
                    "request %s finished: %d tokens, KV ceiling %d, peak KV entries %d, %d online compactions",
                    request.request_id,
                    request.num_computed_tokens,
                    state.params.max_kv_tokens,
                    state.peak_physical,
                    state.online_count,
                )
        self.am_reports.finished(request.request_id, state.peak_physical if state is not None else None)
        return super()._free_request(request, *args, **kwargs)

    def shutdown(self) -> None:
        self.am_reports.close()  # this engine's report files (the front end removes the run directory)
        super().shutdown()
