"""Captured reference queries stay inside a memory budget (issue 21 §2), on vLLM's real scheduler,
KV-cache manager and block pool: the scheduler reserves each compacting request's capture before any
worker captures, a request that does not fit is served uncompacted with the reason in its report, and the
memory comes back when its compaction ends. Only the worker is stood in for (each job is done on the step
its layers run, writing no KV)."""

from __future__ import annotations

import pytest
from stand_in_worker import StandInWorker
from vllm.v1.request import RequestStatus

from vllm_attnmatch.config import ConfigError, parse_server_config
from vllm_attnmatch.contract.jobs import SCHEDULER_OUTPUT_ATTR
from vllm_attnmatch.engine.capture_budget import MIB, online_rows, prefill_rows
from vllm_attnmatch.ipc.report import COMPACTED, NOT_COMPACTED

BLOCK = 16
ROW_BYTES = 30 * 9 * 64 * 4 + 8  # SmolLM2-135M in float32: layers x query heads x head size x 4 B + position
PROMPT = 136  # a 128-token span (8 blocks) and a raw tail: 128 captured rows, 8.4 MiB


@pytest.fixture
def budget_scheduler(engine_config, make_scheduler, monkeypatch):
    """``budget_scheduler(mib)``: the plugin's scheduler with ``capture_budget_mib=mib`` (None: default)."""

    def make(mib, num_blocks: int = 400):
        section = {} if mib is None else {"capture_budget_mib": mib}
        monkeypatch.setitem(engine_config.additional_config, "attnmatch", section)
        return make_scheduler(num_blocks)

    return make


def _run(scheduler, worker, requests, steps: int = 200):
    """Every request arrives at once; the engine steps until all are finished. Returns the most capture
    memory reserved at once."""
    for request in requests:
        scheduler.add_request(request)
    peak = 0
    for _ in range(steps):
        if all(r.is_finished() for r in requests):
            return peak
        worker.step(scheduler)
        peak = max(peak, scheduler._am_capture.used)
    raise AssertionError("requests did not finish")


def _reports(scheduler, requests) -> dict[str, object]:
    """The final report of each request (the recorder's retained reports, by engine id)."""
    return {r.request_id: scheduler.am_reports._keys[r.request_id].reports[r.request_id] for r in requests}


def test_a_tiny_budget_serves_many_concurrent_compactions_without_a_crash_and_reports_why(
    budget_scheduler, make_request
):
    scheduler = budget_scheduler(20)  # two 8.4 MiB prompt captures fit, a third does not
    prompts = [make_request(f"p{i}", list(range(1000 * i, 1000 * i + PROMPT)), am_ratio=0.25) for i in range(12)]
    online = [make_request(f"o{i}", list(range(50000 + 100 * i, 50000 + 100 * i + 40)), am_max_kv_tokens=64)
              for i in range(2)]
    peak = _run(scheduler, StandInWorker(), prompts + online)
    reports = _reports(scheduler, prompts + online)
    compacted = [r for r in reports.values() if r.status == COMPACTED]
    refused = [r for r in reports.values() if r.status == NOT_COMPACTED]
    assert len(compacted) == 2 and len(refused) == 12
    assert 0 < peak <= 20 * MIB
    assert all(r.reason.startswith("capture budget 20.0 MiB exhausted") and r.reason.endswith("served uncompacted")
               for r in refused)
    assert all(r.finished for r in reports.values())
    assert scheduler._am_capture.used == 0 and scheduler._am_capture.held() == {}  # everything given back
    assert scheduler.am_stats.values["skipped"] == scheduler.am_stats.values["capture_refused"] == 12
    assert scheduler.am_stats.values["capture_budget_bytes"] == 20 * MIB
    assert scheduler.am_stats.values["capture_reserved_bytes"] == 0


def test_the_memory_comes_back_when_a_compaction_ends_not_when_its_request_does(
    budget_scheduler, make_request
):
    scheduler = budget_scheduler(10)  # one prompt capture at a time
    first = make_request("first", list(range(1000, 1000 + PROMPT)), am_ratio=0.25)
    scheduler.add_request(first)
    worker = StandInWorker()
    while not _reports(scheduler, [first])["first"].compacted:
        worker.step(scheduler)
    worker.step(scheduler)
    assert not first.is_finished() and scheduler._am_capture.used == 0  # still decoding, capture given back
    second = make_request("second", list(range(3000, 3000 + PROMPT)), am_ratio=0.25)
    _run(scheduler, worker, [second])
    assert [r.status for r in _reports(scheduler, [first, second]).values()] == [COMPACTED, COMPACTED]


def test_a_capture_is_reserved_before_the_workers_capture_and_released_on_abort(budget_scheduler, make_request):
    scheduler = budget_scheduler(10)
    scheduler.add_request(make_request("a", list(range(1000, 1000 + PROMPT)), am_ratio=0.25))
    output = scheduler.schedule()
    plan = getattr(output, SCHEDULER_OUTPUT_ATTR)
    assert "a" in plan.capture_stride and scheduler._am_capture.used == prefill_rows(128, 4096) * ROW_BYTES
    scheduler.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert scheduler._am_capture.used == 0


def test_the_default_budget_holds_four_largest_captures_and_the_key_overrides_it(budget_scheduler):
    assert budget_scheduler(None)._am_capture.limit == 4 * min(4096, 2048) * ROW_BYTES
    assert budget_scheduler(1.5)._am_capture.limit == int(1.5 * MIB)
    assert online_rows(1024, 2048) == 4096  # an online ring's worst case: ring peak plus the job's copy
    with pytest.raises(ConfigError, match="capture_budget_mib"):
        parse_server_config({"capture_budget_mib": 0})


def test_an_online_ring_reserves_no_more_rows_than_its_request_can_have(budget_scheduler, make_request):
    """Eight short online generations (40 prompt + 200 output tokens) all watch their ceilings inside a
    budget of eight of their rings; reserved at the server-wide worst case (3 rings of 1024 rows, and its
    copy), not even one would fit and all eight would grow uncompacted."""
    assert online_rows(1024, 2048, 240) == 480 and online_rows(1024, 2048) == 4096
    scheduler = budget_scheduler(8 * 480 * ROW_BYTES / MIB)
    online = [make_request(f"o{i}", list(range(50000 + 100 * i, 50000 + 100 * i + 40)), am_max_kv_tokens=64,
                           max_tokens=200) for i in range(8)]
    peak = _run(scheduler, StandInWorker(), online, steps=400)
    assert peak == 8 * 480 * ROW_BYTES
    assert scheduler.am_stats.values.get("capture_refused", 0) == 0
    assert not any("capture budget" in (r.reason or "") for r in _reports(scheduler, online).values())


def test_a_request_refused_again_after_a_preemption_is_counted_once(budget_scheduler, make_request):
    """``capture_refused`` counts requests: one refused, preempted and refused again in its next life is
    one request served uncompacted, not two."""
    scheduler = budget_scheduler(10)  # one prompt capture at a time
    first = make_request("first", list(range(1000, 1000 + PROMPT)), am_ratio=0.25)
    second = make_request("second", list(range(3000, 3000 + PROMPT)), am_ratio=0.25)
    worker = StandInWorker()
    for request in (first, second):
        scheduler.add_request(request)
    worker.step(scheduler)
    assert scheduler.am_stats.values["capture_refused"] == 1  # "second" did not fit beside "first"
    scheduler.reset_prefix_cache(reset_running_requests=True)  # vLLM preempts both: each starts a new life
    for _ in range(200):
        if first.is_finished() and second.is_finished():
            break
        worker.step(scheduler)
    statuses = {k: r.status for k, r in _reports(scheduler, [first, second]).items()}
    assert statuses == {"first": COMPACTED, "second": NOT_COMPACTED}
    assert scheduler.am_stats.values["capture_refused"] == 1


def test_the_budget_is_logged_once_at_start_up_in_mib_with_where_it_came_from(budget_scheduler):
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    log = logging.getLogger("vllm.attnmatch.scheduler")
    log.addHandler(handler)
    try:
        budget_scheduler(1.5)
        budget_scheduler(None)
    finally:
        log.removeHandler(handler)
    budgets = [m for m in records if "capture budget" in m]
    assert len(budgets) == 2
    assert budgets[0].startswith("vllm-attnmatch capture budget 1.5 MiB per device (capture_budget_mib)")
    default_mib = 4 * min(4096, 2048) * ROW_BYTES / MIB
    assert budgets[1].startswith(f"vllm-attnmatch capture budget {default_mib:.1f} MiB per device (default: 4 captures")
    assert f"a captured row takes {ROW_BYTES} bytes" in budgets[1]
