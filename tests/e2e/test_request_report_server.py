"""A client learns what happened to its own request: ``GET /v1/attnmatch/requests/{id}`` with the ``id``
of the response, through the real server and the ``openai`` client; a client-chosen X-Request-Id is answered
only in its response form and never once another request reused it."""

from __future__ import annotations

import uuid

import openai
import pytest

pytestmark = pytest.mark.server


def _report(server, client_id: str) -> dict:
    body = server.client().get(f"/attnmatch/requests/{client_id}", cast_to=object)
    assert body["object"] == "attnmatch.request_report" and body["id"] == client_id
    (report,) = body["data"]  # one prompt, n=1: one engine request
    return report


def test_a_compacted_request_reports_t_to_t_method_and_seconds(plugin_server, document):
    client = plugin_server.client()
    reply = client.completions.create(
        model="smollm2", prompt=document, max_tokens=4, temperature=0,
        extra_body={"vllm_xargs": {"am_ratio": 0.1, "am_method": "omp", "am_keep_first": 3}},  # unique: no prefix hit
    )
    report = _report(plugin_server, reply.id)
    assert report["status"] == "compacted" and report["compacted"] and report["reason"] is None
    assert report["finished"] and report["request_id"].startswith(reply.id + "-")
    assert report["prompt_tokens"] == reply.usage.prompt_tokens
    assert report["method"] == "omp" and report["queries"] == "context" and report["ratio"] == 0.1
    assert report["keep_first"] == 3
    # T is the prefix up to the last whole block before the kept tail; t holds ~10 % of its span.
    assert 0 < report["tokens_before"] <= reply.usage.prompt_tokens
    assert report["span_tokens_after"] == max(1, int(0.1 * report["span_tokens_before"]))
    assert report["tokens_after"] < report["tokens_before"]
    assert report["blocks_after"] < report["blocks_before"]
    assert report["seconds"] > 0 and not report["prefix_hit"]
    parts = report["seconds_by_component"]  # where the workers' seconds went
    assert {"gather", "scoring", "beta", "values", "write"} <= set(parts)
    assert 0.5 * report["seconds"] <= sum(parts.values()) <= report["seconds"] * 1.01 + 1e-3


def test_an_on_policy_compaction_reports_its_source_and_its_pass(tiny_pool_server, document):
    """The tiny-pool server runs with ``on_policy``: a self_study request is compacted by the one
    teacher-forced pass (layer l fitted on queries that went through compacted layers < l)."""
    client = tiny_pool_server.client()
    before = tiny_pool_server.metrics()
    reply = client.completions.create(
        model="smollm2", prompt=document, max_tokens=4, temperature=0,
        extra_body={"vllm_xargs": {"am_ratio": 0.1, "am_queries": "self_study", "am_keep_first": 5}},
    )
    report = _report(tiny_pool_server, reply.id)
    after = tiny_pool_server.metrics()
    assert report["status"] == "compacted" and report["queries"] == "self_study on-policy"
    assert {"reference_queries", "on_policy_forward", "scoring", "values", "write"} <= set(report["seconds_by_component"])
    assert after["failures"] == before["failures"]
    assert after["reference_query_seconds"] > before["reference_query_seconds"]


def test_the_same_document_again_reports_a_compacted_prefix_hit(plugin_server, document):
    client = plugin_server.client()
    xargs = {"vllm_xargs": {"am_ratio": 0.12}}  # a ratio no other test uses: the first is a miss
    first = client.completions.create(model="smollm2", prompt=document, max_tokens=2, temperature=0, extra_body=xargs)
    again = client.completions.create(model="smollm2", prompt=document, max_tokens=2, temperature=0, extra_body=xargs)
    assert not _report(plugin_server, first.id)["prefix_hit"]
    report = _report(plugin_server, again.id)
    assert report["status"] == "compacted" and report["prefix_hit"] and report["seconds"] == 0
    assert report["prefill_tokens_saved"] == report["tokens_before"] > 0


def test_a_failed_compaction_reports_the_workers_error(plugin_server, document):
    # The plugin server runs with fault injection on (see conftest); am_keep_first=5: no stored prefix.
    reply = plugin_server.client().completions.create(
        model="smollm2", prompt=document, max_tokens=2, temperature=0,
        extra_body={"vllm_xargs": {"am_ratio": 0.1, "am_keep_first": 5, "attnmatch_fault": "solver"}},
    )
    report = _report(plugin_server, reply.id)
    assert report["status"] == "failed" and not report["compacted"]
    assert report["reason"].startswith("compaction failed:") and "injected solver error" in report["reason"]
    assert report["reason"].endswith("served uncompacted") and report["tokens_after"] is None


def test_online_recompactions_and_an_unreached_ceiling_are_reported(plugin_server, document):
    client = plugin_server.client()
    # ~620 prompt tokens under a 512-entry ceiling: the prefill stops at the ceiling and re-compacts there.
    online = client.completions.create(
        model="smollm2", prompt=document, max_tokens=4, temperature=0,
        extra_body={"vllm_xargs": {"am_max_kv_tokens": 512}},
    )
    report = _report(plugin_server, online.id)
    assert report["status"] == "compacted" and report["online_compactions"] >= 1 and report["online_seconds"] > 0
    assert 512 <= report["online_last_tokens_before"] and report["online_last_tokens_after"] < 512
    assert report["max_kv_tokens"] == 512 and report["tokens_before"] is None  # no prompt budget asked
    quiet = client.completions.create(
        model="smollm2", prompt="The quick brown fox", max_tokens=2, temperature=0,
        extra_body={"vllm_xargs": {"am_max_kv_tokens": 2048}},
    )
    report = _report(plugin_server, quiet.id)
    assert report["status"] == "not_compacted" and report["finished"]
    assert report["reason"].startswith("its KV never reached the ceiling am_max_kv_tokens=2048 (peak ")


def test_a_too_short_streamed_chat_says_it_was_not_compacted_and_why(plugin_server):
    stream = plugin_server.client().chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=4, temperature=0, stream=True, extra_body={"vllm_xargs": {"am_ratio": 0.1}},
    )
    ids = {chunk.id for chunk in stream}
    (chat_id,) = ids
    report = _report(plugin_server, chat_id)
    assert report["status"] == "not_compacted" and not report["compacted"]
    assert report["reason"].startswith(f"prompt too short: {report['prompt_tokens']} tokens")
    assert "compaction needs at least" in report["reason"] and report["tokens_before"] is None


def test_a_request_without_am_keys_has_no_report_and_its_404_says_so(plugin_server):
    reply = plugin_server.client().completions.create(
        model="smollm2", prompt="The quick brown fox", max_tokens=2, temperature=0,
    )
    with pytest.raises(openai.NotFoundError) as err:
        plugin_server.client().get(f"/attnmatch/requests/{reply.id}", cast_to=object)
    assert "only requests that asked for compaction" in err.value.body["message"]


def test_an_x_request_id_is_answered_by_the_response_id_only_and_to_nobody_once_reused(plugin_server):
    header = f"my-request-{uuid.uuid4().hex[:8]}"
    client = plugin_server.client()

    def send():
        return client.completions.create(
            model="smollm2", prompt="The quick brown fox", max_tokens=2, temperature=0,
            extra_headers={"X-Request-Id": header}, extra_body={"vllm_xargs": {"am_ratio": 0.1}},
        )

    reply = send()
    assert reply.id == f"cmpl-{header}"
    assert _report(plugin_server, reply.id)["status"] == "not_compacted"  # too short, but asked
    with pytest.raises(openai.NotFoundError):
        client.get(f"/attnmatch/requests/{header}", cast_to=object)  # the bare header is no response id
    send()  # another client picks the same X-Request-Id
    with pytest.raises(openai.ConflictError) as err:
        client.get(f"/attnmatch/requests/{reply.id}", cast_to=object)
    assert "more than one client" in err.value.body["message"]


def test_an_unknown_id_is_a_404_that_says_which_id_to_pass(plugin_server):
    with pytest.raises(openai.NotFoundError) as err:
        plugin_server.client().get("/attnmatch/requests/cmpl-does-not-exist", cast_to=object)
    assert err.value.status_code == 404
    message = err.value.body["message"]
    assert "no attnmatch report for id 'cmpl-does-not-exist'" in message and "'id' of a completion" in message


def test_a_chosen_id_is_answered_only_to_the_credentials_it_was_sent_with(plugin_server):
    """Header- or body-chosen ids are not secrets: their reports go to the same Authorization only; any
    other caller gets the 404 of an unknown id."""
    from openai import OpenAI

    alice, bob = (OpenAI(base_url=plugin_server.url + "/v1", api_key=key, max_retries=0) for key in ("alice", "bob"))
    header = f"scoped-{uuid.uuid4().hex[:8]}"
    reply = alice.completions.create(
        model="smollm2", prompt="The quick brown fox", max_tokens=2, temperature=0,
        extra_headers={"X-Request-Id": header}, extra_body={"vllm_xargs": {"am_ratio": 0.1}},
    )
    chosen = f"scoped-body-{uuid.uuid4().hex[:8]}"
    chat = alice.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Name a colour."}], max_tokens=2, temperature=0,
        extra_body={"request_id": chosen, "vllm_xargs": {"am_ratio": 0.1}},
    )
    assert (reply.id, chat.id) == (f"cmpl-{header}", f"chatcmpl-{chosen}")
    for response_id in (reply.id, chat.id):
        body = alice.get(f"/attnmatch/requests/{response_id}", cast_to=object)
        assert body["data"][0]["status"] == "not_compacted"  # too short, but asked
        with pytest.raises(openai.NotFoundError) as err:
            bob.get(f"/attnmatch/requests/{response_id}", cast_to=object)
        assert f"no attnmatch report for id {response_id!r}" in err.value.body["message"]
