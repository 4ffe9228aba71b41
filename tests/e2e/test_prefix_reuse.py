"""Compacted prefixes in the prefix cache: ingest a document once, ask many questions."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.server

DOC_TOKENS = 512  # four CPU blocks: the compacted span ends exactly at the document's end


@pytest.fixture(scope="module")
def doc_and_questions(tokenizer, document):
    doc = tokenizer(document)["input_ids"][:DOC_TOKENS]
    questions = [
        tokenizer("\n\nQuestion: who may copy and distribute this license, and under which conditions?\nAnswer:")["input_ids"],
        tokenizer("\n\nQuestion: what does the word 'free' refer to in this text, and why does it matter?\nAnswer:")["input_ids"],
    ]
    assert all(16 <= len(q) < 128 for q in questions)
    return doc, questions


def _ask(server, prompt_ids, xargs=None, **extra):
    body = dict(extra)
    if xargs is not None:
        body["vllm_xargs"] = xargs
    started = time.perf_counter()
    stream = server.client().completions.create(
        model="smollm2", prompt=prompt_ids, max_tokens=16, temperature=0, stream=True, extra_body=body or None
    )
    text, first_token_s = "", None
    for chunk in stream:
        if first_token_s is None:
            first_token_s = time.perf_counter() - started
        text += chunk.choices[0].text if chunk.choices else ""
    return text, first_token_s


def test_second_question_reuses_the_compacted_document(plugin_server, doc_and_questions):
    doc, (q1, q2) = doc_and_questions
    xargs = {"am_ratio": 0.2}
    salt = {"cache_salt": "reuse-test"}  # other tests may have stored this document's compaction
    before = plugin_server.metrics()
    _, ttft_first = _ask(plugin_server, doc + q1, xargs, **salt)
    after_first = plugin_server.metrics()
    assert after_first["compactions"] == before["compactions"] + 1
    assert after_first["prefix_misses"] == before["prefix_misses"] + 1

    reused, ttft_second = _ask(plugin_server, doc + q2, xargs, **salt)
    after_second = plugin_server.metrics()
    assert after_second["prefix_hits"] == after_first["prefix_hits"] + 1
    assert after_second["prefill_tokens_saved"] == after_first["prefill_tokens_saved"] + DOC_TOKENS
    assert after_second["compactions"] == after_first["compactions"]  # nothing compacted again
    print(f"time to first token: first request {ttft_first:.2f} s, second (reuse) {ttft_second:.2f} s; "
          f"prompt tokens prefilled by the second: {len(q2)} of {DOC_TOKENS + len(q2)}")

    # A fresh compaction of the same prefix (a different cache_salt cannot hit) gives the same tokens.
    fresh, _ = _ask(plugin_server, doc + q2, xargs, cache_salt="fresh-compaction")
    after_fresh = plugin_server.metrics()
    assert after_fresh["prefix_hits"] == after_second["prefix_hits"]
    assert after_fresh["compactions"] == after_second["compactions"] + 1
    assert fresh == reused


@pytest.mark.parametrize(
    "xargs, salt",
    [
        ({"am_ratio": 0.2}, "someone-else"),
        ({"am_ratio": 0.1}, None),
        ({"am_ratio": 0.2, "am_method": "snapkv"}, None),
        ({"am_ratio": 0.2, "am_keep_first": 0}, None),
    ],
)
def test_different_salt_or_parameters_do_not_hit(plugin_server, doc_and_questions, request, xargs, salt):
    doc, (q1, _) = doc_and_questions
    stored_salt = f"variants-{request.node.callspec.id}"
    _ask(plugin_server, doc + q1, {"am_ratio": 0.2}, cache_salt=stored_salt)  # stores this compaction
    hits = plugin_server.metrics()["prefix_hits"]
    _ask(plugin_server, doc + q1, xargs, cache_salt=salt or stored_salt)
    assert plugin_server.metrics()["prefix_hits"] == hits
    # ...while the same request with the stored salt and parameters does hit.
    _ask(plugin_server, doc + q1, {"am_ratio": 0.2}, cache_salt=stored_salt)
    assert plugin_server.metrics()["prefix_hits"] == hits + 1


def test_requests_without_am_keys_never_receive_compacted_blocks(plugin_server, stock_server, doc_and_questions):
    doc, (q1, _) = doc_and_questions
    _ask(plugin_server, doc + q1, {"am_ratio": 0.2})
    hits = plugin_server.metrics()["prefix_hits"]
    plain, _ = _ask(plugin_server, doc + q1)
    assert plugin_server.metrics()["prefix_hits"] == hits
    stock, _ = _ask(stock_server, doc + q1)
    assert plain == stock


def test_a_longer_question_still_reuses_the_documents_compaction(plugin_server, doc_and_questions):
    doc, (q1, q2) = doc_and_questions
    salt = "longer-question"
    _ask(plugin_server, doc + q1, {"am_ratio": 0.2}, cache_salt=salt)
    long_question = (q2 * 8)[:200]  # its own compactable span would reach into the question
    before = plugin_server.metrics()
    _ask(plugin_server, doc + long_question, {"am_ratio": 0.2}, cache_salt=salt)
    after = plugin_server.metrics()
    assert after["prefix_hits"] == before["prefix_hits"] + 1
    assert after["prefill_tokens_saved"] == before["prefill_tokens_saved"] + DOC_TOKENS
    assert after["compactions"] == before["compactions"]
