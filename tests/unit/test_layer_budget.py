"""One compaction budget per engine step (issue 21 §4), on vLLM's real scheduler, KV-cache manager and
block pool: all jobs in flight share ``compaction_layers_per_step`` layers per step (oldest first, none
starves), and an idle batch runs bounded chunks of ``idle_layers_per_step`` so that a request arriving
meanwhile is scheduled at the next step rather than after the whole job. Only the worker is stood in
for: it counts each job's layers the way ``JobRun.run_layers`` does and reports the job on the step its
last layer runs."""

from __future__ import annotations

import pytest

from stand_in_worker import StandInWorker

from vllm_attnmatch.engine.request_state import CompactionPhase

QUESTION = [7] * 8


def _document(i: int) -> list[int]:
    return list(range(1000 + 200 * i, 1128 + 200 * i))  # 128 tokens: an 8-block span, its job ships at once


@pytest.fixture
def layered_scheduler(engine_config, make_scheduler, monkeypatch):
    """``layered_scheduler(num_layers, **settings)``: the plugin's scheduler for a KV cache of
    ``num_layers`` layers with the given server settings."""

    def make(num_layers: int, num_blocks: int = 400, **settings):
        monkeypatch.setitem(engine_config.additional_config, "attnmatch", dict(settings))
        return make_scheduler(num_blocks, num_layers=num_layers)

    return make


def test_concurrent_compactions_share_one_layer_budget_per_step(layered_scheduler, make_request):
    """k jobs in flight must not cost k slices per step: the step's budget is shared, and every job
    still gets all its layers (oldest first, so none starves)."""
    layers, budget = 4, 2
    scheduler = layered_scheduler(layers, compaction_layers_per_step=budget)
    worker = StandInWorker(layers)
    scheduler.add_request(make_request("neighbour", [3] * 20, max_tokens=200))  # keeps the batch busy
    compacting = [f"c{i}" for i in range(3)]
    for i, req_id in enumerate(compacting):
        scheduler.add_request(make_request(req_id, _document(i) + QUESTION, am_ratio=0.25))
    _, first = worker.step(scheduler)
    assert sorted(job.req_id for job in first.jobs) == compacting  # three jobs in flight at once

    finished_at = {}
    for step in range(1, 20):
        output, plan = worker.step(scheduler)
        assert "neighbour" in output.num_scheduled_tokens  # busy: the per-step budget applies
        assert sum(plan.slices.values()) <= budget, f"step {step} ran {plan.slices}"
        for req_id in compacting:
            if req_id not in finished_at and scheduler._am_requests[req_id].phase is CompactionPhase.APPLIED:
                finished_at[req_id] = step
        if len(finished_at) == len(compacting):
            break
    assert worker.layers_run == {r: layers for r in compacting}  # every job ran all of its layers
    assert sorted(finished_at.values()) == [2, 4, 6]  # 12 layers at 2 a step, the oldest job first


def test_an_idle_batch_compacts_in_bounded_chunks_and_a_new_request_is_scheduled_at_the_next_step(
    layered_scheduler, make_request
):
    """Alone, a job may take more than the busy slice per step, but never the whole job in one step:
    a request arriving during that step waits for one chunk, not for every layer."""
    layers, idle = 20, 8
    scheduler = layered_scheduler(layers, idle_layers_per_step=idle)
    worker = StandInWorker(layers)
    scheduler.add_request(make_request("doc", _document(0) + QUESTION, am_ratio=0.25))
    _, first = worker.step(scheduler)
    (job,) = first.jobs

    output, plan = worker.step(scheduler)  # nothing else to run: an idle batch
    assert output.total_num_scheduled_tokens == 0
    assert plan.slices == {"doc": idle}  # more than one layer, but a bounded chunk of the job
    assert scheduler._am_requests["doc"].job is job  # still in flight

    scheduler.add_request(make_request("newcomer", [9] * 24))  # arrives during that step
    output, plan = worker.step(scheduler)
    assert "newcomer" in output.num_scheduled_tokens  # scheduled at the very next step
    assert sum(plan.slices.values()) == 1  # busy again: back to compaction_layers_per_step
    assert scheduler._am_requests["doc"].job is job

    for _ in range(40):
        if scheduler._am_requests["doc"].phase is CompactionPhase.APPLIED:
            break
        output, plan = worker.step(scheduler)
        assert sum(plan.slices.values()) <= idle
    assert scheduler._am_requests["doc"].phase is CompactionPhase.APPLIED
    assert worker.layers_run == {"doc": layers}


def test_jobs_get_the_idle_budget_while_a_waiting_request_needs_the_blocks_they_will_free(
    layered_scheduler, make_request
):
    """Busy, but the pool is short: the request at the head of the queue needs more blocks than are free,
    and the job in flight frees most of its raw blocks when it finishes. Held to one layer a step it would
    keep them for every layer of the model; it gets the idle budget instead, and the waiting request is
    admitted as soon as the job is done."""
    layers, idle = 24, 8
    scheduler = layered_scheduler(layers, num_blocks=20, idle_layers_per_step=idle)  # 19 usable
    worker = StandInWorker(layers)
    scheduler.add_request(make_request("neighbour", [3] * 20, max_tokens=200))  # keeps the batch busy
    scheduler.add_request(make_request("doc", _document(0) + QUESTION, am_ratio=0.25))  # 9 raw blocks
    _, first = worker.step(scheduler)
    assert [job.req_id for job in first.jobs] == ["doc"]
    scheduler.add_request(make_request("big", [5] * 150))  # 10 blocks: fits only once "doc" is compacted
    steps = 0
    while scheduler._am_requests["doc"].phase is not CompactionPhase.APPLIED:
        output, plan = worker.step(scheduler)
        steps += 1
        assert "neighbour" in output.num_scheduled_tokens and "big" not in output.num_scheduled_tokens
        assert plan.slices == {"doc": idle}
    assert steps == layers // idle  # applied on the step its last layer runs: 3 steps, not 24
    output, _ = worker.step(scheduler)
    assert "big" in output.num_scheduled_tokens


def test_with_room_for_the_waiting_request_a_busy_step_keeps_the_small_budget(layered_scheduler, make_request):
    scheduler = layered_scheduler(24, num_blocks=60, idle_layers_per_step=8)
    worker = StandInWorker(24)
    scheduler.add_request(make_request("neighbour", [3] * 20, max_tokens=200))
    scheduler.add_request(make_request("doc", _document(0) + QUESTION, am_ratio=0.25))
    worker.step(scheduler)
    output, plan = worker.step(scheduler)
    assert "neighbour" in output.num_scheduled_tokens and plan.slices == {"doc": 1}


def test_a_job_short_of_destination_blocks_waits_for_the_jobs_in_flight_instead_of_being_skipped(
    layered_scheduler, make_request
):
    """Two documents prefilled in one step fill the pool: the first job takes the last destination blocks,
    the second finds none. Skipped, it would keep its whole raw prompt for the rest of its life; it waits,
    held out of the batch with its captured queries, and ships once the first job has freed its raw
    blocks."""
    layers = 4
    scheduler = layered_scheduler(layers, num_blocks=20)  # 19 usable
    worker = StandInWorker(layers)
    for i in range(2):  # 8 blocks of document each, then 2 destination blocks each: 20 > 19
        scheduler.add_request(make_request(f"doc{i}", _document(i) + QUESTION, am_ratio=0.25))
    _, first = worker.step(scheduler)
    assert [job.req_id for job in first.jobs] == ["doc0"]
    assert scheduler._am_requests["doc1"].prefilling  # not skipped: it waits
    shipped = {}
    for step in range(1, 12):
        output, plan = worker.step(scheduler)
        assert "doc1" not in output.num_scheduled_tokens or not scheduler._am_requests["doc1"].prefilling
        shipped.update({job.req_id: step for job in plan.jobs})
    assert "doc1" in shipped
    stats = scheduler.am_stats.values
    assert stats["skipped"] == 0 and stats["prefill_compactions"] == 2
