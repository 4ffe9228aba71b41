"""The scheduler's and worker's pieces of a compaction's life, without vLLM: the phase state machine,
the chunk clamp, layer-sliced jobs, and the memory rules of the reference-query capture."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from vllm_attnmatch.attention.step_context import CaptureRows, StepContext
from vllm_attnmatch.config import ServerConfig, effective_params, parse_request_params
from vllm_attnmatch.contract.jobs import CompactionJob
from vllm_attnmatch.engine.chunking import clamp_new_tokens
from vllm_attnmatch.engine.layouts import layout_for_span
from vllm_attnmatch.engine.request_state import CompactionPhase, IllegalTransition, RequestCompaction
from vllm_attnmatch.worker.executor import JobRun, run_job

P = CompactionPhase


def _state(max_kv_tokens=None, layout=True):
    extra = {"am_ratio": 0.25}
    if max_kv_tokens is not None:
        extra["am_max_kv_tokens"] = max_kv_tokens
    params = effective_params(ServerConfig(), parse_request_params(extra))
    return RequestCompaction(params, layout_for_span(256, 4, 0.25, None, 16) if layout else None)


def _job(state):
    return CompactionJob("r", state.layout, (), (), "highest_attention", "context", None)


def test_a_prompt_compaction_goes_prefilling_in_flight_applied():
    state = _state()
    assert state.phase is P.PREFILLING
    state.move(P.IN_FLIGHT)
    state.job = _job(state)
    state.settle(P.APPLIED)
    assert state.phase is P.APPLIED and state.job is None
    with pytest.raises(IllegalTransition):
        state.move(P.IN_FLIGHT)  # compacted once per life


def test_an_online_request_watches_its_ceiling_after_its_prompt_compaction_succeeds_or_fails():
    for outcome in (P.APPLIED, P.FAILED):
        state = _state(max_kv_tokens=512)
        state.move(P.IN_FLIGHT)
        state.job = _job(state)
        state.settle(outcome)
        assert state.phase is P.WATCHING


def test_preemption_restarts_the_life_from_any_phase():
    state = _state()
    state.move(P.IN_FLIGHT)
    state.lookup_done, state.lookup_counted = True, True
    state.restart()
    assert state.phase is P.PREFILLING and state.job is None
    assert not state.lookup_done and not state.lookup_counted  # the next life looks up (and counts) again
    online = _state(max_kv_tokens=512, layout=False)
    online.move(P.IN_FLIGHT)
    online.restart()
    assert online.phase is P.WATCHING


def test_the_chunk_is_clamped_at_the_span_end_at_the_ceiling_and_to_nothing_in_flight():
    state = _state()
    assert clamp_new_tokens(state, 0, 512, 0) == 256  # stops where the prompt compacts
    assert clamp_new_tokens(state, 256, 100, 0) == 100  # past it: untouched
    state.lookup_hit = (state.layout, b"key")
    assert clamp_new_tokens(state, 256, 100, 0) == 100  # a stored compacted prefix: nothing to stop for
    state.lookup_hit = None
    state.move(P.IN_FLIGHT)
    assert clamp_new_tokens(state, 256, 1, 0) == 0  # held out while its job is in flight
    online = _state(max_kv_tokens=300, layout=False)
    assert clamp_new_tokens(online, 1000, 512, 1000) == 300  # stops at logical ceiling + offset
    assert clamp_new_tokens(online, 1250, 512, 1000) == 50
    assert clamp_new_tokens(online, 1300, 1, 1000) == 1  # at the ceiling: the step that compacts


class DenseKV:
    """A paged KV layout in plain tensors (block-major, like the runners'): what ``PagedKV`` promises."""

    def __init__(self, num_layers=4, num_blocks=64, block_size=16, heads=2, dim=8):
        torch.manual_seed(0)
        self.k = {f"model.layers.{i}.attn": torch.randn(num_blocks, heads, block_size, dim) for i in range(num_layers)}
        self.v = {n: torch.randn_like(t) for n, t in self.k.items()}
        self.b = {n: torch.zeros(num_blocks, heads, block_size) for n in self.k}
        self.block_size = block_size

    def layer_names(self):
        return list(self.k)

    def scale(self, layer):
        return 1 / math.sqrt(8)

    def _rows(self, cache, block_ids, length):
        t = cache[torch.as_tensor(block_ids)]  # (n, H, bs, ...)
        return t.transpose(0, 1).reshape(t.shape[1], -1, *t.shape[3:])[:, :length]

    def gather(self, layer, block_ids, length):
        return self._rows(self.k[layer], block_ids, length), self._rows(self.v[layer], block_ids, length)

    def gather_bias(self, layer, block_ids, length):
        return self._rows(self.b[layer], block_ids, length)

    def write(self, layer, block_ids, keys, values, beta):
        for i, block in enumerate(block_ids):
            lo, hi = i * self.block_size, min((i + 1) * self.block_size, keys.shape[1])
            self.k[layer][block].zero_(), self.v[layer][block].zero_(), self.b[layer][block].zero_()
            if hi > lo:
                self.k[layer][block, :, : hi - lo] = keys[:, lo:hi]
                self.v[layer][block, :, : hi - lo] = values[:, lo:hi]
                self.b[layer][block, :, : hi - lo] = beta[:, lo:hi]


def _prefill_job():
    layout = layout_for_span(192, 4, 0.25, None, 16)
    return CompactionJob("r", layout, tuple(range(12)), tuple(range(40, 40 + 5)), "highest_attention", "context", None)


def _queries(kv):
    torch.manual_seed(1)
    return {n: torch.randn(96, 4, 8) for n in kv.layer_names()}, torch.arange(0, 192, 2)


def test_a_job_run_in_layer_slices_writes_what_one_go_writes_and_reports_only_at_the_end():
    whole, sliced = DenseKV(), DenseKV()
    job = _prefill_job()
    queries, positions = _queries(whole)
    assert run_job(job, whole, dict(queries), positions).ok
    run = JobRun(job, sliced, dict(queries), positions)
    steps = 0
    while not run.done:
        run.run_layers(1)
        steps += 1
        if not run.done:
            assert not run.result().ok  # a half-done job is never applied
    assert steps == 4 and run.result().ok
    for name in whole.layer_names():
        assert torch.equal(whole.k[name][40:45], sliced.k[name][40:45])
        assert torch.equal(whole.b[name][40:45], sliced.b[name][40:45])
    assert run.queries == {}  # every layer's queries were freed as it was compacted


def test_a_job_reports_where_its_seconds_went():
    """The per-request report's ``seconds_by_component``: reading the source, the algorithm's parts, the
    executor around them and the write-back, adding up to the job's seconds."""
    kv = DenseKV()
    queries, positions = _queries(kv)
    run = JobRun(_prefill_job(), kv, queries, positions)
    run.run_layers(4)
    result = run.result()
    assert result.ok
    assert {"gather", "scoring", "beta", "values", "prepare", "write"} <= set(result.timings)
    assert all(seconds > 0 for seconds in result.timings.values())  # each component was really timed
    assert sum(result.timings.values()) <= result.seconds * 1.001 + 1e-4
    assert sum(result.timings.values()) >= 0.5 * result.seconds  # the laps cover the timed work


def test_a_failed_slice_keeps_the_job_until_its_last_slice_then_reports_the_failure():
    kv = DenseKV()
    job = dataclasses.replace(_prefill_job(), fault="solver")  # the test-only fault of the engine's tests
    queries, positions = _queries(kv)
    run = JobRun(job, kv, queries, positions)
    run.run_layers(2)
    assert run.error and not run.done  # every rank still reaches the same final step
    run.run_layers(2)
    assert run.done and not run.result().ok and run.queries == {}


def test_captured_queries_keep_the_model_dtype_and_only_the_strided_rows():
    ctx = StepContext()
    ctx.begin_step({"r": CaptureRows(0, 64, first_position=0, stride=4)}, [])
    ctx.record_queries("layer", torch.randn(64, 9, 16, dtype=torch.bfloat16))
    queries, positions = ctx.take_queries("r")
    assert queries["layer"].dtype == torch.bfloat16 and queries["layer"].shape == (16, 9, 16)
    assert positions.tolist() == list(range(0, 64, 4))
    assert ctx.captured_bytes() == 0  # taken: nothing left behind


def _query_too_large_to_copy(rows: int) -> torch.Tensor:
    """A (rows, H_q, d) query whose captured copy cannot be allocated on the CPU: a broadcast view of one
    element, with 2^40 elements per row (the copy fails in the CPU allocator, as on a full machine)."""
    return torch.zeros(1, 1, 1).expand(rows, 2**20, 2**20)


def test_an_out_of_memory_capture_drops_that_request_and_its_job_fails_instead_of_the_step():
    ctx = StepContext()
    ctx.begin_step({"r": CaptureRows(0, 8, 0, 1), "other": CaptureRows(0, 8, 0, 1)}, [])
    ctx.record_queries("layer0", torch.randn(8, 2, 4))
    ctx.capture = {"r": ctx.capture["r"]}
    # The CPU allocator's real failure (a RuntimeError, not CUDA's OutOfMemoryError) must not raise
    # inside the attention forward.
    ctx.record_queries("layer1", _query_too_large_to_copy(8))
    assert "r" not in ctx.captured_queries and "other" in ctx.captured_queries
    with pytest.raises(RuntimeError, match="out of memory"):
        ctx.take_queries("r")
    ctx.forget(["r"])
    assert ctx.capture_failed == {}


@pytest.mark.parametrize("failure", [MemoryError(), torch.OutOfMemoryError("CUDA out of memory")])
def test_every_kind_of_out_of_memory_drops_only_that_capture(failure):
    class _Failing:
        device = torch.device("cpu")

        def __getitem__(self, index):
            raise failure

    ctx = StepContext()
    ctx.begin_step({"r": CaptureRows(0, 8, 0, 1)}, [])
    ctx.record_queries("layer0", _Failing())
    assert "r" in ctx.capture_failed


def test_a_capture_error_that_is_not_out_of_memory_is_not_swallowed():
    ctx = StepContext()
    ctx.begin_step({"r": CaptureRows(0, 8, 0, 1)}, [])
    with pytest.raises(IndexError):
        ctx.record_queries("layer0", torch.randn(4, 2, 4))  # a bug (rows past the batch) stays loud


def test_a_cpu_allocation_failure_while_compacting_fails_only_that_job(monkeypatch):
    import vllm_attnmatch.worker.executor as executor

    def allocate_too_much(*args, **kwargs):
        return torch.empty(2**50, dtype=torch.uint8)  # the CPU allocator refuses: RuntimeError

    monkeypatch.setattr(executor, "compact_layer", allocate_too_much)
    kv = DenseKV()
    queries, positions = _queries(kv)
    run = JobRun(_prefill_job(), kv, queries, positions)
    run.run_layers(4)
    result = run.result()
    assert not result.ok and "can't allocate memory" in result.error and run.queries == {}
