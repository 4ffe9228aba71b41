"""Compact once, ask many (issue 18): with ``--attnmatch documents`` a document is compacted on its own
(no question in it), stored as a compacted prefix, and a later question about a fact planted in it is
answered over the compacted cache — through the real server and the ``openai`` client."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.server

HEADER = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nRead the following document.\n\n"
FACT = "The special magic number for Bruno is 849306."
QUESTION = ("\n\nWhat is the special magic number for Bruno?<|im_end|>\n<|im_start|>assistant\n"
            "The special magic number for Bruno is")


def _planted_document(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()][:70]
    return HEADER + "\n".join(lines[:30] + [FACT] + lines[30:])


def test_a_fact_survives_compaction_of_its_document_and_later_questions_reuse_it(documents_server, tokenizer):
    document = _planted_document(Path("/usr/share/common-licenses/GPL-3").read_text())
    assert 700 < len(tokenizer(document)["input_ids"]) < 1200
    client = documents_server.client()
    xargs = {"am_ratio": 0.25}
    before = documents_server.metrics()
    ingest = client.completions.create(model="smollm2", prompt=document, max_tokens=1, temperature=0,
                                       extra_body={"vllm_xargs": xargs})
    report = client.get(f"/attnmatch/requests/{ingest.id}", cast_to=object)["data"][0]
    assert report["status"] == "compacted", report
    assert report["method"] == "highest_attention" and report["queries"] == "repeat"
    assert report["span_tokens_after"] <= 0.25 * report["span_tokens_before"] + 1
    answers = []
    for _ in range(2):  # compact once, ask many: both questions start from the stored compacted prefix
        reply = client.completions.create(model="smollm2", prompt=document + QUESTION, max_tokens=8, temperature=0,
                                          extra_body={"vllm_xargs": xargs})
        answers.append(reply.choices[0].text)
        assert client.get(f"/attnmatch/requests/{reply.id}", cast_to=object)["data"][0]["prefix_hit"]
    after = documents_server.metrics()
    assert after["compactions"] == before["compactions"] + 1 and after["failures"] == before["failures"]
    assert after["prefix_hits"] >= before["prefix_hits"] + 2
    assert all(a.strip().startswith("849306") for a in answers), answers
