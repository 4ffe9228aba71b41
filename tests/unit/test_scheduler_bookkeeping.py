"""Small scheduler-side contracts (issue 21 §6), on vLLM's real scheduler where the defect lives there:
a result is booked only against the job it came from; a preempted request forgets its online retry
point; a request vLLM refuses leaves no state and no report; the start-up warm-up runs the server's
own method."""

from __future__ import annotations

import pytest
from vllm.v1.outputs import ModelRunnerOutput

from vllm_attnmatch.config import ServerConfig, effective_params, parse_request_params
from vllm_attnmatch.contract.jobs import RUNNER_OUTPUT_ATTR, SCHEDULER_OUTPUT_ATTR, CompactionResult, StepPlan
from vllm_attnmatch.engine.chunking import clamp_new_tokens
from vllm_attnmatch.engine.request_state import CompactionPhase, RequestCompaction
from vllm_attnmatch.worker.runner import warm_up_job

DOCUMENT = list(range(1000, 1128))
QUESTION = [7] * 8


def _plan(output) -> StepPlan:
    return getattr(output, SCHEDULER_OUTPUT_ATTR, None) or StepPlan()


def _runner_output(output, results=()) -> ModelRunnerOutput:
    """What the workers return for a step of prefill chunks that sample nothing, with plugin results."""
    req_ids = list(output.num_scheduled_tokens)
    runner_output = ModelRunnerOutput(
        req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=[[] for _ in req_ids]
    )
    if results:
        setattr(runner_output, RUNNER_OUTPUT_ATTR, list(results))
    return runner_output


def _result(job, ok=True) -> CompactionResult:
    return CompactionResult(job.req_id, ok, 0.1, job.layout.num_tokens, job.layout.physical_len, job_id=job.job_id)


def test_a_result_of_a_cancelled_job_is_not_booked_against_the_next_job_of_the_same_request(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=64)
    scheduler.add_request(make_request("a", DOCUMENT + QUESTION, am_ratio=0.25))
    first = scheduler.schedule()
    (old_job,) = _plan(first).jobs
    scheduler.update_from_output(first, _runner_output(first))
    scheduler.reset_prefix_cache(reset_running_requests=True)  # vLLM preempts it: the job is cancelled
    second = scheduler.schedule()  # its next life prefills the prefix again and ships a new job
    (new_job,) = _plan(second).jobs
    assert new_job.req_id == "a" and new_job.job_id != old_job.job_id

    scheduler.update_from_output(second, _runner_output(second, [_result(old_job)]))  # a late, stale result
    state = scheduler._am_requests["a"]
    assert state.phase is CompactionPhase.IN_FLIGHT and state.job is new_job  # still waiting for its own
    assert "a" not in scheduler._am_swaps and "a" not in scheduler._am_cancel

    third = scheduler.schedule()
    scheduler.update_from_output(third, _runner_output(third, [_result(new_job)]))
    assert state.phase is CompactionPhase.APPLIED and scheduler._am_swaps["a"] == new_job.dst_block_ids


def test_a_preempted_online_request_forgets_its_retry_point():
    params = effective_params(ServerConfig(), parse_request_params({"am_max_kv_tokens": 512}))
    state = RequestCompaction(params, None)
    state.online_retry_at = 700  # no free blocks at its ceiling in the old life: retry a block later
    state.restart()
    assert clamp_new_tokens(state, 0, 2000, 0) == 512  # the new life compacts at its own ceiling again


def test_a_request_vllm_refuses_leaves_no_plugin_state_and_no_report(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=64)
    scheduler.add_request(make_request("x", DOCUMENT + QUESTION, am_ratio=0.25))
    state, report = scheduler._am_requests["x"], scheduler.am_reports.live["x"]
    with pytest.raises(AssertionError, match="duplicate request id"):
        scheduler.add_request(make_request("x", DOCUMENT))  # vLLM refuses a second request with that id
    assert scheduler._am_requests["x"] is state
    assert scheduler.am_reports.live["x"] is report


@pytest.mark.parametrize("method", ["omp", "snapkv"])
def test_the_start_up_warm_up_compacts_with_the_servers_method_and_options(method):
    settings = ServerConfig(method=method, algorithm={method: {"tile_queries": 64}} if method == "omp" else {})
    job = warm_up_job(settings, block_size=16)
    assert job.method == method
    assert job.options == dict(settings.algorithm_options(method))
