"""Model-runner side of the plugin, shared by the CPU and CUDA runners (V1 model runner only).

Three things change for a compacted request, and nothing changes for the others:
- its block-table row is replaced by the compacted blocks when the scheduler says so;
- its KV slots and attention lengths are *physical* (logical minus the offset) while its RoPE positions
  stay logical;
- after the forward of the step that completes its prefill, its KV is compacted (see ``executor``).

The β side tensor and the reference-query capture are shared with the attention impls through one
:class:`StepContext` per runner.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from vllm.logger import init_logger

from vllm_attnmatch.attention.step_context import CaptureRows, StepContext
from vllm_attnmatch.contract.jobs import RUNNER_OUTPUT_ATTR, SCHEDULER_OUTPUT_ATTR, CompactionResult, StepPlan
from vllm_attnmatch.worker.executor import JobRun, PagedKV
from vllm_attnmatch.worker.fresh_blocks import bias_blocks_to_zero
from vllm_attnmatch.worker.tensor_parallel import agree_on_result, job_for_this_rank

logger = init_logger("vllm.attnmatch.runner")


def log_worker_start(worker) -> None:
    """The worker's own start-up line (tests read it to prove the plugin runs in the worker process)."""
    import os

    from vllm_attnmatch import __version__
    from vllm_attnmatch.config import ServerConfig, server_config_from

    settings = server_config_from(worker.vllm_config.additional_config) or ServerConfig()
    logger.info(
        "vllm-attnmatch %s active (worker rank %d, pid %d): %s", __version__, worker.rank, os.getpid(), settings.summary()
    )


def _log_side_memory(bias: dict[str, torch.Tensor], kv_caches) -> None:
    """Account for the β side tensors: they are allocated after vLLM sized the KV cache, so say how much
    they add (one fp32 per KV slot and head: head_dim × 2 × dtype-size times smaller than K and V)."""
    beta_bytes = sum(t.numel() * t.element_size() for t in bias.values())
    kv_bytes = sum(t.numel() * t.element_size() for t in kv_caches if isinstance(t, torch.Tensor))
    share = f" ({100 * beta_bytes / kv_bytes:.2f} % of the KV cache)" if kv_bytes else ""
    logger.info("vllm-attnmatch: β side tensors %.1f MiB%s, outside vLLM's profiled budget",
                beta_bytes / 2**20, share)


def warm_up_job(settings, block_size: int, tokens: int = 256):
    """The start-up compaction: the server's own method with its options, so that the set-up it pays
    is the one real jobs would (another method warms other code paths)."""
    from vllm_attnmatch.algorithms.budgets import budget
    from vllm_attnmatch.contract.jobs import CompactionJob, CompactionLayout, block_padding

    keep_first = 4
    target = budget(tokens - keep_first, ratio=0.1)  # what the scheduler plans for a span just prefilled
    pad = block_padding(keep_first + target, block_size)
    layout = CompactionLayout(num_tokens=tokens, keep_first=keep_first, span_end=tokens, target=target, pad=pad)
    options = dict(settings.algorithm_options(settings.method))
    return CompactionJob("warm-up", layout, (), (), settings.method, "context", None, options=options)


class AttnMatchRunnerMixin:
    """Mixed in front of ``GPUModelRunner`` / ``CPUModelRunner``; subclasses supply ``_make_paged_kv``."""

    _am_ctx: StepContext | None = None
    _am_kv: PagedKV | None = None
    _am_plan: StepPlan | None = None
    _am_producer = None  # SyntheticQueryProducer, built on the first repeat / self_study job
    _am_server_config = None
    _am_results: list[CompactionResult]
    _am_inflight: dict[str, JobRun]

    # -- set-up ------------------------------------------------------------------------------------

    def _make_paged_kv(self, layer_names: list[str]) -> tuple[PagedKV, dict[str, torch.Tensor]]:
        """Return the layout adapter and the per-layer β side tensors (zeros)."""
        raise NotImplementedError

    def initialize_kv_cache(self, kv_cache_config, *args, **kwargs):
        super().initialize_kv_cache(kv_cache_config, *args, **kwargs)
        layer_names = [name for group in kv_cache_config.kv_cache_groups for name in group.layer_names]
        self._am_kv, bias = self._make_paged_kv(layer_names)
        _log_side_memory(bias, getattr(self, "kv_caches", []))
        self._am_ctx = StepContext(bias=bias)
        self._am_results = []
        self._am_inflight = {}
        forward_context = self.compilation_config.static_forward_context
        for name in layer_names:
            forward_context[name].impl.attnmatch = self._am_ctx
        self._warm_up_compaction(forward_context[layer_names[0]], next(iter(bias.values())))

    @torch.inference_mode()
    def _warm_up_compaction(self, layer, bias: torch.Tensor) -> None:
        """Run one tiny compaction at start-up: the first fit in a process pays one-off set-up costs
        (seconds of linear-algebra initialisation on CPU) that would otherwise land in the first layer
        slice of the first real job and stall that step's batch."""
        from vllm_attnmatch.worker.executor import compact_layer

        try:
            num_kv_heads, head_size = bias.shape[1], int(layer.impl.head_size)
            num_heads = int(layer.impl.num_heads)
            job = warm_up_job(self._am_settings(), bias.shape[2])
            tokens, dtype = job.layout.num_tokens, self.model_config.dtype
            keys = torch.randn(num_kv_heads, tokens, head_size, device=bias.device, dtype=dtype)
            values = torch.randn_like(keys)
            queries = torch.randn(tokens, num_heads, head_size, device=bias.device, dtype=dtype)
            compact_layer(job, keys, values, queries.float(), torch.arange(tokens), head_size**-0.5)
        except Exception as exc:  # noqa: BLE001 - a warm-up never stops the server
            logger.warning("compaction warm-up failed (%s); the first compaction pays its set-up", exc)

    # -- per step ----------------------------------------------------------------------------------

    def _update_states(self, scheduler_output):
        plan: StepPlan = getattr(scheduler_output, SCHEDULER_OUTPUT_ATTR, None) or StepPlan()
        self._am_plan = plan
        ctx = self._am_ctx
        if ctx is not None:
            dropped = set(scheduler_output.finished_req_ids) | set(plan.cancel)
            ctx.forget(dropped)
            for req_id in dropped:  # preempted, aborted or failed: nothing of the job stays alive
                run = self._am_inflight.pop(req_id, None)
                if run is not None:
                    run.release()
            self._zero_new_bias(scheduler_output)
            for req_id, block_ids in plan.swaps.items():
                self._replace_block_row(req_id, list(block_ids))
        return super()._update_states(scheduler_output)

    def _zero_new_bias(self, scheduler_output) -> None:
        """β is indexed by physical slot: a block handed out again must not carry an old request's β."""
        fresh = bias_blocks_to_zero(scheduler_output, self._am_plan.preserve_bias)
        if fresh:
            index = torch.tensor(fresh, dtype=torch.long)
            for bias in self._am_ctx.bias.values():
                bias.index_fill_(0, index.to(bias.device), 0.0)

    def _replace_block_row(self, req_id: str, block_ids: list[int]) -> None:
        state = self.requests.get(req_id)
        if state is None:
            return
        state.block_ids = (block_ids,)
        row = self.input_batch.req_id_to_index.get(req_id)
        if row is not None:
            self.input_batch.block_table.clear_row(row)
            self.input_batch.block_table.add_row((block_ids,), row)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        plan, ctx = self._am_plan, self._am_ctx
        if ctx is None or plan is None:
            return result
        if not (plan.offsets or plan.capture_stride):
            ctx.begin_step({}, [])  # no plugin work in this batch: nothing per request on the hot path
            return result
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        if plan.offsets:
            offsets = np.array([plan.offsets.get(r, 0) for r in req_ids], dtype=np.int64)
            total = scheduler_output.total_num_scheduled_tokens
            req_index = np.repeat(np.arange(num_reqs), num_scheduled_tokens)
            token_offsets = torch.from_numpy(offsets[req_index]).to(self.positions.device)
            physical = self.positions[:total] - token_offsets
            self.input_batch.block_table.compute_slot_mapping(
                num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical
            )
            per_req = torch.from_numpy(offsets)
            self.seq_lens[:num_reqs] -= per_req.to(self.seq_lens.device, self.seq_lens.dtype)
            self.optimistic_seq_lens_cpu[:num_reqs] -= per_req.to(self.optimistic_seq_lens_cpu.dtype)
        starts = self.query_start_loc.cpu[: num_reqs + 1].tolist()
        capture = {}
        for req_id, stride in plan.capture_stride.items():
            row = self.input_batch.req_id_to_index.get(req_id)
            if row is None or stride <= 0:
                continue
            first = int(self.input_batch.num_computed_tokens_cpu[row])
            capture[req_id] = CaptureRows(starts[row], starts[row + 1], first, stride)
        biased = [i for i, r in enumerate(req_ids) if r in plan.offsets]
        ctx.begin_step(capture, biased, starts)
        return result

    def execute_model(self, scheduler_output, *args, **kwargs):
        output = super().execute_model(scheduler_output, *args, **kwargs)
        plan = self._am_plan
        if plan is not None and (plan.jobs or plan.slices):
            self._run_jobs(plan)
        if self._am_ctx is not None:
            self._am_ctx.begin_step({}, [])
            if plan is not None and plan.capture_limit:
                self._am_ctx.trim(plan.capture_limit)
        return output if output is None else self._attach_results(output)

    def sample_tokens(self, *args, **kwargs):
        return self._attach_results(super().sample_tokens(*args, **kwargs))

    def _attach_results(self, output):
        if not getattr(self, "_am_results", None) or output is None:
            return output
        output = copy.copy(output)  # never mutate vLLM's shared empty output
        setattr(output, RUNNER_OUTPUT_ATTR, self._am_results)
        self._am_results = []
        return output

    @torch.inference_mode()
    def _run_jobs(self, plan: StepPlan) -> None:
        """Start the jobs shipped this step (their queries were captured by this step's forward) and run
        this step's layer slices of the jobs in flight; a job whose last layer ran reports its result.
        A new job runs no layer in the step that ships it: that step already carries its last prefill
        chunk."""
        for job in plan.jobs:
            job = job_for_this_rank(job, self.vllm_config.model_config.get_total_num_kv_heads())
            try:
                queries, positions = self._am_ctx.take_queries(job.req_id, keep=job.layout.online)
            except RuntimeError as exc:  # the capture was dropped (out of memory): the job fails cleanly
                run = JobRun(job, self._am_kv, {}, None)
                run.error = str(exc)
                self._am_inflight[job.req_id] = run
                continue
            extra, source, compacted = None, "context", None
            if job.queries != "context" and not job.layout.online:
                queries, positions, extra, source, compacted = self._synthetic_queries(job, queries, positions)
            run = JobRun(job, self._am_kv, queries, positions, extra, compacted)
            run.query_source = source
            self._am_inflight[job.req_id] = run
        for req_id, count in plan.slices.items():
            run = self._am_inflight.get(req_id)
            if run is None:
                continue
            run.run_layers(count)
            if run.done:
                del self._am_inflight[req_id]
                self._am_results.append(self._finish_job(run))

    def _finish_job(self, run: JobRun) -> CompactionResult:
        """The result of a job whose last layer slice ran on this step (every rank reaches it together)."""
        result = run.result()
        cost = run.source_cost
        if cost is not None:
            result = dataclasses.replace(
                result,
                seconds=result.seconds + cost.seconds,
                # a layered source (repeat) makes its queries inside the slices, where the executor times
                # them as reference_queries; what a source spent before the first slice adds to that
                query_seconds=cost.query_seconds + result.timings.get("reference_queries", 0.0),
                timings={name: result.timings.get(name, 0.0) + cost.components.get(name, 0.0)
                         for name in {**result.timings, **cost.components}},
                query_source=run.query_source,
            )
        result = agree_on_result(result)  # tensor parallel: applied only if it succeeded on every rank
        run.release()
        if not result.ok:
            logger.warning("compaction of %s failed on this worker: %s", run.job.req_id, result.error)
        return result

    def _synthetic_queries(self, job, queries, positions):
        """Add ``repeat`` / ``self_study`` queries (the context's own kept up to ``query_mix``). Any error
        falls back to the context queries: a weaker compaction beats none."""
        from vllm_attnmatch.worker.query_sources import cap_rows
        from vllm_attnmatch.worker.synthetic import SyntheticQueryProducer

        settings = self._am_settings()
        try:
            if self._am_producer is None:
                self._am_producer = SyntheticQueryProducer.for_model(self.vllm_config.model_config, settings)
            request = self.requests[job.req_id]
            if settings.on_policy:
                mixed, mixed_positions = cap_rows(queries, positions, settings.query_mix.get("context", 0))
                compacted = self._am_producer.produce_on_policy(
                    job, self._am_kv, list(request.prompt_token_ids), mixed, mixed_positions)
                return {}, None, None, f"{job.queries} on-policy", compacted
            extra = self._am_producer.produce(job, self._am_kv, list(request.prompt_token_ids))
        except Exception as exc:  # noqa: BLE001 - fall back to context queries
            logger.warning("am_queries=%s unavailable for %s (%s); using context queries", job.queries, job.req_id, exc)
            return queries, positions, None, "context", None
        queries, positions = cap_rows(queries, positions, settings.query_mix.get("context", 0))
        return queries, positions, extra, job.queries, None

    def _am_settings(self):
        from vllm_attnmatch.config import ServerConfig, server_config_from

        if self._am_server_config is None:
            self._am_server_config = server_config_from(self.vllm_config.additional_config) or ServerConfig()
        return self._am_server_config
