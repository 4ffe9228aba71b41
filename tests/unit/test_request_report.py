"""The per-request report: what the recorder writes for each kind of request, how the front end finds a
client's request among the engine's ids (vLLM's own id functions), client-chosen ids that cannot reach
another client's report, bounded memory and files, lookups that read one file per engine, nothing written
for plain requests, a private run directory removed at exit, and the HTTP route attached through vLLM's
endpoint-plugin machinery."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from types import SimpleNamespace

import pytest

from vllm_attnmatch.config import ConfigError, ServerConfig, effective_params, parse_request_params
from vllm_attnmatch.contract.jobs import CompactionJob, CompactionResult
from vllm_attnmatch.engine.layouts import plan_layout, plan_online_layout
from vllm_attnmatch.ipc.report import (
    COMPACTED,
    FAILED,
    NOT_COMPACTED,
    NOT_REQUESTED,
    PENDING,
    AmbiguousId,
    ReportRecorder,
    find_reports,
    lookup_keys,
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


def test_a_request_with_am_keys_but_no_budget_is_not_requested_with_the_reason(tmp_path):
    recorder = _recorder(tmp_path)
    _admit(recorder, "nobudget-1a2b3c4d", 650, {"am_method": "omp"})
    recorder.flush()
    (no_budget,) = find_reports("nobudget", tmp_path)
    assert no_budget["status"] == NOT_REQUESTED and no_budget["reason"].startswith("no budget: am_* keys without am_ratio")


def test_a_request_that_never_asked_for_compaction_writes_nothing_and_holds_no_memory(tmp_path):
    """Plain traffic costs the recorder nothing: its id is a 404 (documented in report_endpoint)."""
    recorder = _recorder(tmp_path)
    _admit(recorder, "plain-1a2b3c4d", 650, None)
    recorder.finished("plain-1a2b3c4d")
    recorder.flush()
    assert list(tmp_path.rglob("*")) == [] and recorder.live == {}
    assert find_reports("plain", tmp_path) == []


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
    "sent_to_engine, response_id",
    [
        ("cmpl-5f3a9c2e11d04b7a-0", "cmpl-5f3a9c2e11d04b7a"),  # completions: one prompt
        ("cmpl-mine-1", "cmpl-mine"),  # completions: second prompt, X-Request-Id "mine"
        ("cmpl-a-7-0", "cmpl-a-7"),  # X-Request-Id "a-7"
        ("chatcmpl-5f3a9c2e11d04b7a", "chatcmpl-5f3a9c2e11d04b7a"),  # chat
        ("chatcmpl-mine_1", "chatcmpl-mine"),  # chat: second sub-request
    ],
)
@pytest.mark.parametrize("n", [1, 2])
def test_the_response_id_finds_vllms_engine_ids_and_the_bare_x_request_id_does_not(sent_to_engine, response_id, n):
    engine_ids = _vllm_engine_ids(sent_to_engine, n)
    assert len(set(engine_ids)) == n
    for engine_id in engine_ids:
        keys = lookup_keys(engine_id)
        assert response_id in keys
        assert "mine" not in keys and "cmpl-5f3a9c2e" not in keys and response_id + "x" not in keys
    assert "cmpl-mine" not in lookup_keys(_vllm_engine_ids("chatcmpl-mine")[0])


def _many(recorder, ids, xargs={"am_ratio": 0.1}):  # noqa: B006 - read only
    for req_id in ids:
        _admit(recorder, req_id, 100, xargs)
    recorder.flush()


def test_a_reused_client_chosen_id_is_answered_to_neither_client(tmp_path):
    """Two clients sending X-Request-Id "mine": the same response id, two of vLLM's random suffixes."""
    recorder = _recorder(tmp_path)
    first, second = _vllm_engine_ids("cmpl-mine-0")[0], _vllm_engine_ids("cmpl-mine-0")[0]
    _many(recorder, [first])
    (report,) = find_reports("cmpl-mine", tmp_path)  # alone, the id answers
    assert report["request_id"] == first
    _many(recorder, [second])
    with pytest.raises(AmbiguousId):
        find_reports("cmpl-mine", tmp_path)
    assert find_reports("mine", tmp_path) == []  # the bare header is not an id the server answers


def test_a_reused_chat_id_alone_and_as_a_sub_request_is_ambiguous(tmp_path):
    recorder = _recorder(tmp_path)
    _many(recorder, [_vllm_engine_ids("chatcmpl-mine")[0], _vllm_engine_ids("chatcmpl-mine_1")[0]])
    with pytest.raises(AmbiguousId):
        find_reports("chatcmpl-mine", tmp_path)
    assert len(find_reports("chatcmpl-mine_1", tmp_path)) == 1


def test_the_prompts_and_samples_of_one_response_are_one_submission(tmp_path):
    recorder = _recorder(tmp_path)
    _many(recorder, [*_vllm_engine_ids("cmpl-batch-0", 2), *_vllm_engine_ids("cmpl-batch-1", 2)])
    assert len(find_reports("cmpl-batch", tmp_path)) == 4


def test_without_vllms_random_suffix_a_reused_engine_id_is_ambiguous(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "1")
    recorder = _recorder(tmp_path)
    _many(recorder, ["cmpl-mine-0"])
    recorder.finished("cmpl-mine-0")
    assert len(find_reports("cmpl-mine", tmp_path)) == 1
    _many(recorder, ["cmpl-mine-0"])  # another client, the same id once the first has finished
    with pytest.raises(AmbiguousId):
        find_reports("cmpl-mine", tmp_path)


def test_the_same_id_on_two_engines_is_ambiguous_and_one_engine_answers_alone(tmp_path):
    """Data parallel: each engine has its own folder; the front end merges them."""
    one, two = (ReportRecorder(SERVER, BLOCK, engine_index=i, directory=str(tmp_path)) for i in (0, 1))
    _many(one, [_vllm_engine_ids("cmpl-dp-0")[0]])
    assert len(find_reports("cmpl-dp", tmp_path)) == 1
    _many(two, [_vllm_engine_ids("cmpl-dp-0")[0]])
    with pytest.raises(AmbiguousId):
        find_reports("cmpl-dp", tmp_path)


def test_a_lookup_reads_one_small_file_whatever_the_number_of_reports(tmp_path, monkeypatch):
    recorder = _recorder(tmp_path)
    _many(recorder, [f"cmpl-{i:05d}-0-{i:08x}" for i in range(1500)])
    stored = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    read = []
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        read.append(os.path.getsize(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)
    (report,) = find_reports("cmpl-00042", tmp_path)
    monkeypatch.undo()
    assert report["request_id"] == "cmpl-00042-0-0000002a"
    assert len(read) == 1 and sum(read) < 2000 < stored / 100


def test_memory_and_files_stay_bounded_and_live_reports_are_kept(tmp_path):
    recorder = _recorder(tmp_path, max_reports=10)
    _admit(recorder, "long-00000000", 650, {"am_ratio": 0.1})  # stays in the engine throughout
    recorder.flush()
    for i in range(1, 60):
        _admit(recorder, f"r{i}-{i:08x}", 100, {"am_ratio": 0.1})
        recorder.finished(f"r{i}-{i:08x}")
        recorder.flush()
    assert len(list(tmp_path.rglob("*.json"))) == 10 and recorder._held == 10 and len(recorder._keys) == 10
    assert find_reports("long", tmp_path)[0]["status"] == PENDING  # live: never dropped
    assert find_reports("r59", tmp_path)[0]["finished"]
    assert find_reports("r1", tmp_path) == []  # old enough to be gone
    assert recorder.live.keys() == {"long-00000000"}


def test_a_full_recorder_rewrites_only_what_changed(tmp_path, monkeypatch):
    """Once at its bound, a step with one changed report writes one file (no rotation of everything)."""
    import vllm_attnmatch.ipc.report as report_module

    recorder = _recorder(tmp_path, max_reports=8)
    _many(recorder, [f"live{i}-{i:08x}" for i in range(8)])
    for i in range(8, 30):
        _admit(recorder, f"done{i}-{i:08x}", 100, {"am_ratio": 0.1})
        recorder.finished(f"done{i}-{i:08x}")
        recorder.flush()
    writes = []
    real = report_module.atomic_write
    monkeypatch.setattr(report_module, "atomic_write", lambda path, text: (writes.append(path), real(path, text)))
    recorder.finished("live3-00000003")
    recorder.flush()
    assert len(writes) == 1


def test_reports_of_another_run_in_the_same_directory_are_ignored(tmp_path):
    old = ReportRecorder(SERVER, BLOCK, directory=str(tmp_path), run="0123456789abcdef")
    _many(old, ["cmpl-stale-0-00000001"])
    assert find_reports("cmpl-stale", tmp_path, run="0123456789abcdef")
    assert find_reports("cmpl-stale", tmp_path, run="fedcba9876543210") == []


def test_the_engines_shutdown_removes_its_report_files(tmp_path, monkeypatch, make_scheduler, make_request):
    from vllm_attnmatch.ipc.metrics import RUN_ID_ENV, STATS_DIR_ENV

    monkeypatch.setenv(STATS_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(RUN_ID_ENV, "00000000000000aa")
    scheduler = make_scheduler(64)
    scheduler.add_request(make_request("cmpl-x-0-00000001", list(range(200)), am_ratio=0.5))
    scheduler.am_reports.flush()
    assert find_reports("cmpl-x", tmp_path)[0]["status"] == PENDING
    scheduler.shutdown()
    assert not any(p.name.startswith("reports-") for p in tmp_path.iterdir())


def test_the_route_serves_reports_and_a_clear_404_through_vllms_endpoint_plugins(tmp_path, monkeypatch):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    import vllm.plugins
    from vllm.plugins.endpoint_plugins.interface import attach_endpoint_plugins
    from vllm_attnmatch.frontend import report_endpoint
    from vllm_attnmatch.ipc.metrics import STATS_DIR_ENV

    monkeypatch.setattr(vllm.plugins, "load_endpoint_plugins", vllm.plugins.load_endpoint_plugins)  # restored after
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.setenv(STATS_DIR_ENV, str(tmp_path))
    assert report_endpoint.install() and report_endpoint.install()  # idempotent
    app = FastAPI()
    attach_endpoint_plugins(app, ("generate",))
    assert [p.name for p in app.state.endpoint_plugins] == [report_endpoint.PLUGIN_NAME]

    from vllm_attnmatch.ipc.report_scope import ScopeRecorder

    scopes = ScopeRecorder(tmp_path)  # chosen ids, recorded as the API server's middleware records them
    scopes.record("xyz", None), scopes.record("mine", None)
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
    assert "only requests that asked for compaction" in error["message"]
    _many(recorder, [_vllm_engine_ids("cmpl-mine-0")[0], _vllm_engine_ids("cmpl-mine-0")[0]])  # two clients
    reused = client.get("/v1/attnmatch/requests/cmpl-mine")
    assert reused.status_code == 409 and "data" not in reused.json()
    assert "more than one client" in reused.json()["error"]["message"]

    plain = FastAPI()
    attach_endpoint_plugins(plain, ("embed",))  # a pooling server gets no generation report route
    assert TestClient(plain).get("/v1/attnmatch/requests/chatcmpl-xyz").status_code == 404
    assert plain.state.endpoint_plugins == []


def test_the_report_module_imports_no_vllm():
    code = "import sys, vllm_attnmatch.ipc.report; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- the run directory (shared with the metrics files) --------------------------------------------------


def test_the_run_directory_is_private_unique_and_removed_when_the_front_end_exits():
    code = (
        "import os, stat; from vllm_attnmatch.ipc import metrics; d = metrics.install_collector(); "
        "print(d, oct(stat.S_IMODE(os.stat(d).st_mode)), os.environ[metrics.RUN_ID_ENV])"
    )
    env = {k: v for k, v in os.environ.items() if "ATTNMATCH_" not in k}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
            for _ in range(2)]
    (dir1, mode1, run1), (dir2, mode2, run2) = (r.stdout.split() for r in runs)
    assert mode1 == mode2 == "0o700" and dir1 != dir2 and run1 != run2
    assert not os.path.exists(dir1) and not os.path.exists(dir2)


def test_an_inherited_directory_is_reused_only_when_private_and_of_a_run(tmp_path, monkeypatch):
    from vllm_attnmatch.ipc import metrics

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    monkeypatch.setenv(metrics.RUN_ID_ENV, "0123456789abcdef")
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(shared))
    assert metrics._inherited_dir() is None
    monkeypatch.setenv(metrics.STATS_DIR_ENV, str(private))
    assert metrics._inherited_dir() == str(private)
    monkeypatch.setenv(metrics.RUN_ID_ENV, "")
    assert metrics._inherited_dir() is None


def test_counters_of_another_run_are_not_summed(tmp_path, monkeypatch):
    from vllm_attnmatch.ipc import metrics

    (tmp_path / "engine-ffffffffffffffff-0-1.json").write_text(json.dumps({"compactions": 7}))
    monkeypatch.setenv(metrics.RUN_ID_ENV, "0123456789abcdef")
    stats = metrics.CompactionStats(0, str(tmp_path))
    stats.add("compactions", 2)
    stats.flush()
    assert metrics.read_totals(tmp_path)["compactions"] == 2


def test_a_counters_write_never_follows_a_planted_temporary_name(tmp_path, monkeypatch):
    from vllm_attnmatch.ipc import metrics

    monkeypatch.setenv(metrics.RUN_ID_ENV, "0123456789abcdef")
    victim = tmp_path / "victim"
    victim.write_text("keep")
    stats = metrics.CompactionStats(0, str(tmp_path))
    stats._path.with_suffix(".tmp").symlink_to(victim)  # the old, predictable name
    stats.add("compactions")
    stats.flush()
    assert victim.read_text() == "keep" and json.loads(stats._path.read_text())["compactions"] == 1
    assert stat.S_IMODE(stats._path.stat().st_mode) == 0o600


def test_another_process_of_the_run_answers_from_the_inherited_directory(tmp_path):
    """--api-server-count > 1: each API-server process inherits the run directory and id through its
    environment (vLLM spawns them after the config hook ran) and reads the engine's files itself."""
    from vllm_attnmatch.ipc import metrics

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    recorder = ReportRecorder(SERVER, BLOCK, directory=str(run_dir), run="0123456789abcdef")
    _many(recorder, [_vllm_engine_ids("cmpl-other-0")[0]])
    code = (
        "from vllm_attnmatch.ipc import metrics, report; d = metrics._inherited_dir(); "
        "print(d, [r['status'] for r in report.find_reports('cmpl-other')])"
    )
    env = {k: v for k, v in os.environ.items() if "ATTNMATCH_" not in k}
    env.update({metrics.STATS_DIR_ENV: str(run_dir), metrics.RUN_ID_ENV: "0123456789abcdef"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == f"{run_dir} ['{NOT_COMPACTED}']"
