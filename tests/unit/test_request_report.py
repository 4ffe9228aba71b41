"""The per-request report: what the recorder writes for each kind of request, how the front end finds a
client's request among the engine's ids (vLLM's own id functions), bounded files, and the HTTP route
attached through vLLM's endpoint-plugin machinery."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from vllm_attnmatch.config import ConfigError, ServerConfig, effective_params, parse_request_params
from vllm_attnmatch.engine.jobs import CompactionJob, CompactionResult, plan_layout, plan_online_layout
from vllm_attnmatch.report import (
    COMPACTED,
    FAILED,
    NOT_COMPACTED,
    NOT_REQUESTED,
    PENDING,
    ReportRecorder,
    find_reports,
    id_pattern,
    shortest_compacted_prompt,
)

BLOCK = 128
SERVER = ServerConfig(keep_first=4, keep_last=16, min_prompt_tokens=32, online_max_compactions=2)


def _request(req_id: str, prompt_tokens: int, xargs: dict | None):
    """A real vLLM engine request (what the scheduler's add_request receives)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    return Request(req_id, list(range(prompt_tokens)), SamplingParams(max_tokens=4, extra_args=xargs), None)


def _recorder(tmp_path, **kwargs) -> ReportRecorder:
    return ReportRecorder(SERVER, BLOCK, directory=str(tmp_path), **kwargs)


def _admit(recorder: ReportRecorder, req_id: str, prompt_tokens: int, xargs: dict | None):
    """What the scheduler does on add_request: its params, its planned layout, then the report."""
    try:
        params = effective_params(SERVER, parse_request_params(xargs))
    except ConfigError:
        params = None  # what Admission.params_for returns for invalid keys
    layout = None
    if params is not None and params.compacts_prefill:
        layout = plan_layout(None, prompt_tokens, params.keep_first, params.keep_last, params.ratio,
                             params.target_tokens, SERVER.min_prompt_tokens, BLOCK)
    recorder.admitted(_request(req_id, prompt_tokens, xargs), params, layout)
    return params, layout


def _job(req_id, layout, params):
    return CompactionJob(req_id, layout, tuple(range(5)), (9,), params.method, params.queries, None)


def _result(req_id, layout, ok=True, error=""):
    return CompactionResult(req_id, ok, 0.25, layout.num_tokens, layout.physical_len, fit_error=0.01, error=error)


def test_a_compacted_request_reports_t_to_t_method_seconds_and_blocks(tmp_path):
    recorder = _recorder(tmp_path)
    params, layout = _admit(recorder, "cmpl-abc-0-1a2b3c4d", 650, {"am_ratio": 0.1})
    recorder.flush()
    (pending,) = find_reports("cmpl-abc", tmp_path)
    assert pending["status"] == PENDING and not pending["compacted"] and not pending["finished"]
    recorder.booked(_job("cmpl-abc-0-1a2b3c4d", layout, params), _result("cmpl-abc-0-1a2b3c4d", layout), applied=True)
    recorder.finished("cmpl-abc-0-1a2b3c4d")
    recorder.flush()
    (report,) = find_reports("cmpl-abc", tmp_path)
    assert report["status"] == COMPACTED and report["compacted"] and report["finished"] and report["reason"] is None
    assert (report["tokens_before"], report["tokens_after"]) == (layout.num_tokens, layout.physical_len) == (512, 128)
    assert (report["span_tokens_before"], report["span_tokens_after"]) == (508, 50)
    assert (report["blocks_before"], report["blocks_after"]) == (5, 1)
    assert report["method"] == "highest_attention" and report["queries"] == "context" and report["ratio"] == 0.1
    assert report["seconds"] == 0.25 and report["fit_error"] == 0.01 and not report["prefix_hit"]
    assert report["request_id"] == "cmpl-abc-0-1a2b3c4d" and "seq" not in report


def test_a_prompt_too_short_says_why_and_how_long_it_would_have_to_be(tmp_path):
    recorder = _recorder(tmp_path)
    _, layout = _admit(recorder, "short-1a2b3c4d", 140, {"am_ratio": 0.1})
    assert layout is None
    recorder.finished("short-1a2b3c4d")
    recorder.flush()
    (report,) = find_reports("short", tmp_path)
    assert report["status"] == NOT_COMPACTED and not report["compacted"]
    assert "prompt too short: 140 tokens" in report["reason"] and "at least 144" in report["reason"]
    # The threshold in the message is the real one: one token more compacts, one less does not.
    assert plan_layout(None, 144, 4, 16, 0.1, None, 32, BLOCK) is not None
    assert plan_layout(None, 143, 4, 16, 0.1, None, 32, BLOCK) is None


@pytest.mark.parametrize(
    "keep_first, keep_last, min_span, block", [(4, 16, 32, 128), (0, 0, 1, 16), (100, 300, 200, 16), (130, 1, 1, 128)]
)
def test_the_shortest_compacted_prompt_in_the_reason_is_the_engines_threshold(keep_first, keep_last, min_span, block):
    shortest = next(n for n in range(1, 4096) if plan_layout(None, n, keep_first, keep_last, 0.5, None, min_span, block))
    assert shortest_compacted_prompt(keep_first, keep_last, min_span, block) == shortest
    assert all(plan_layout(None, n, keep_first, keep_last, 0.5, None, min_span, block) for n in range(shortest, shortest + 300))


def test_a_request_without_am_keys_or_without_a_budget_is_not_requested(tmp_path):
    recorder = _recorder(tmp_path)
    _admit(recorder, "plain-1a2b3c4d", 650, None)
    recorder.finished("plain-1a2b3c4d")
    _admit(recorder, "nobudget-1a2b3c4d", 650, {"am_method": "omp"})
    recorder.flush()
    (report,) = find_reports("plain", tmp_path)
    assert report["status"] == NOT_REQUESTED and not report["compacted"] and "no am_* keys" in report["reason"]
    assert report["finished"] and report["method"] is None
    (no_budget,) = find_reports("nobudget", tmp_path)
    assert no_budget["status"] == NOT_REQUESTED and no_budget["reason"].startswith("no budget: am_* keys without am_ratio")


def test_failures_skips_and_invalid_keys_carry_their_reason(tmp_path):
    recorder = _recorder(tmp_path)
    params, layout = _admit(recorder, "f-00000001", 650, {"am_ratio": 0.1})
    recorder.booked(_job("f-00000001", layout, params), _result("f-00000001", layout, False, "nonfinite C2"), applied=False)
    _admit(recorder, "s-00000002", 650, {"am_ratio": 0.1})
    recorder.skipped("s-00000002", "no free KV blocks for the compacted copy; served uncompacted")
    _admit(recorder, "i-00000003", 650, {"am_ratio": 1.5})  # an offline caller: the front end would say 400
    recorder.flush()
    (failed,) = find_reports("f", tmp_path)
    (skipped,) = find_reports("s", tmp_path)
    (invalid,) = find_reports("i", tmp_path)
    assert failed["status"] == FAILED and "compaction failed: nonfinite C2" in failed["reason"]
    assert skipped["status"] == NOT_COMPACTED and "no free KV blocks" in skipped["reason"]
    assert invalid["status"] == NOT_COMPACTED and invalid["reason"].startswith("invalid am_* keys: am_ratio")


def test_online_recompactions_are_counted_and_an_unreached_ceiling_is_explained(tmp_path):
    recorder = _recorder(tmp_path)
    params, _ = _admit(recorder, "on-00000001", 100, {"am_max_kv_tokens": 256})
    online = plan_online_layout(256, 0, 4, 64, 0.5, 32)
    for _ in range(2):
        recorder.booked(_job("on-00000001", online, params), _result("on-00000001", online), applied=True)
    recorder.finished("on-00000001", peak_kv_tokens=256)
    _admit(recorder, "quiet-00000002", 100, {"am_max_kv_tokens": 4096})
    recorder.finished("quiet-00000002", peak_kv_tokens=140)
    recorder.flush()
    (report,) = find_reports("on", tmp_path)
    assert report["status"] == COMPACTED and report["online_compactions"] == 2 and report["online_seconds"] == 0.5
    assert (report["online_last_tokens_before"], report["online_last_tokens_after"]) == (256, online.physical_len)
    assert report["note"] == "online_max_compactions=2 reached; it grew past its ceiling"
    assert report["peak_kv_tokens"] == 256 and report["tokens_before"] is None  # no prompt compaction asked
    (quiet,) = find_reports("quiet", tmp_path)
    assert quiet["status"] == NOT_COMPACTED and "never reached the ceiling am_max_kv_tokens=4096 (peak 140" in quiet["reason"]


def test_a_prefix_hit_is_reported_as_compacted_with_the_saved_prefill(tmp_path):
    recorder = _recorder(tmp_path)
    _, layout = _admit(recorder, "hit-00000001", 650, {"am_ratio": 0.1})
    recorder.prefix_hit("hit-00000001", layout)
    recorder.flush()
    (report,) = find_reports("hit", tmp_path)
    assert report["status"] == COMPACTED and report["prefix_hit"] and report["prefill_tokens_saved"] == 512
    assert (report["tokens_before"], report["tokens_after"], report["blocks_before"], report["blocks_after"]) == (512, 128, 4, 1)


def _vllm_engine_ids(client_request_id: str, n: int = 1) -> list[str]:
    """Engine request ids exactly as vLLM 0.32 derives them from the id a serving class passes on."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.input_processor import InputProcessor
    from vllm.v1.engine.parallel_sampling import ParentRequest

    request = SimpleNamespace(request_id=client_request_id, external_req_id=None, params=SamplingParams(n=n),
                              sampling_params=SamplingParams(n=n))
    InputProcessor.assign_request_id(request)
    if n == 1:
        return [request.request_id]
    parent = ParentRequest(request)
    return [parent.get_child_info(i)[0] for i in range(n)]


@pytest.mark.parametrize(
    "sent_to_engine, response_id, header",
    [
        ("cmpl-5f3a9c2e11d04b7a-0", "cmpl-5f3a9c2e11d04b7a", None),  # completions: one prompt
        ("cmpl-mine-1", "cmpl-mine", "mine"),  # completions: second prompt, X-Request-Id "mine"
        ("chatcmpl-5f3a9c2e11d04b7a", "chatcmpl-5f3a9c2e11d04b7a", None),  # chat
        ("chatcmpl-mine_1", "chatcmpl-mine", "mine"),  # chat: second sub-request
    ],
)
@pytest.mark.parametrize("n", [1, 2])
def test_the_response_id_and_the_x_request_id_find_vllms_engine_ids(sent_to_engine, response_id, header, n):
    engine_ids = _vllm_engine_ids(sent_to_engine, n)
    assert len(set(engine_ids)) == n
    for engine_id in engine_ids:
        assert id_pattern(response_id).fullmatch(engine_id)
        if header:
            assert id_pattern(header).fullmatch(engine_id)
        assert not id_pattern(response_id + "x").fullmatch(engine_id)
        assert not id_pattern("cmpl-5f3a9c2e").fullmatch(engine_id)  # a prefix of an id is another id
    assert not id_pattern("cmpl-mine").fullmatch("chatcmpl-mine-1a2b3c4d")


def test_files_stay_bounded_and_live_reports_survive_rotation(tmp_path):
    recorder = _recorder(tmp_path, max_lines=10)
    _admit(recorder, "long-00000000", 650, {"am_ratio": 0.1})  # stays in the engine throughout
    recorder.flush()
    for i in range(1, 60):
        _admit(recorder, f"r{i}-{i:08x}", 100, None)
        recorder.finished(f"r{i}-{i:08x}")
        recorder.flush()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(p.name.startswith("reports-0-") for p in tmp_path.iterdir())
    assert sum(len(p.read_text().splitlines()) for p in tmp_path.iterdir()) <= 2 * (10 + 2)
    assert find_reports("long", tmp_path)[0]["status"] == PENDING  # rewritten into each fresh file
    assert find_reports("r59", tmp_path)[0]["finished"]
    assert find_reports("r1", tmp_path) == []  # old enough to be gone
    assert recorder.live.keys() == {"long-00000000"}  # memory: live requests only


def test_a_line_being_written_is_skipped_not_an_error(tmp_path):
    recorder = _recorder(tmp_path)
    _admit(recorder, "ok-00000001", 650, None)
    recorder.flush()
    (path,) = tmp_path.iterdir()
    with path.open("a") as handle:
        handle.write(json.dumps({"request_id": "ok-00000002"})[:15])
    assert [r["request_id"] for r in find_reports("ok", tmp_path)] == ["ok-00000001"]


def test_the_route_serves_reports_and_a_clear_404_through_vllms_endpoint_plugins(tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import vllm.plugins
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins
    from vllm_attnmatch import report_endpoint
    from vllm_attnmatch.metrics import STATS_DIR_ENV

    monkeypatch.setattr(vllm.plugins, "load_endpoint_plugins", vllm.plugins.load_endpoint_plugins)  # restored after
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setenv(STATS_DIR_ENV, str(tmp_path))
    assert report_endpoint.install() and report_endpoint.install()  # idempotent
    app = FastAPI()
    attach_endpoint_plugins(app, ("generate",))
    assert [p.name for p in app.state.endpoint_plugins] == [report_endpoint.PLUGIN_NAME]

    recorder = _recorder(tmp_path)
    _admit(recorder, "chatcmpl-xyz-1a2b3c4d", 140, {"am_ratio": 0.1})
    recorder.flush()
    client = TestClient(app)
    body = client.get("/v1/attnmatch/requests/chatcmpl-xyz").json()
    assert body["object"] == "attnmatch.request_report" and body["id"] == "chatcmpl-xyz"
    assert [r["status"] for r in body["data"]] == [NOT_COMPACTED]
    missing = client.get("/v1/attnmatch/requests/chatcmpl-nope")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == 404 and "no attnmatch report for id 'chatcmpl-nope'" in error["message"]

    plain = FastAPI()
    attach_endpoint_plugins(plain, ("embed",))  # a pooling server gets no generation report route
    assert TestClient(plain).get("/v1/attnmatch/requests/chatcmpl-xyz").status_code == 404
    assert plain.state.endpoint_plugins == []


def test_the_report_module_imports_no_vllm():
    import subprocess
    import sys

    code = "import sys, vllm_attnmatch.report; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
