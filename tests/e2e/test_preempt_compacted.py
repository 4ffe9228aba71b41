"""A request that is already compacted is preempted, resumes, and answers what it answers unpreempted.

On the tiny pool (11 usable 128-token blocks, 512-token chunks): a plain request B (300-token prompt)
decodes; once it holds 4 blocks (100 generated tokens, counted from the usage stats, since the stream may
merge tokens into one chunk), a compacting request A (400-token prompt) arrives, compacts its 384-token
span into one block and decodes 500 tokens. A holds 5 blocks until its compaction is applied, so B may
decode ~370 more tokens before the pool runs out in that phase: a wide margin on a slow machine. Then B
grows to 9 blocks and A to 5: more than the pool has, and vLLM preempts the request that arrived last
(A), after its compaction is applied. A's blocks are freed with its compaction; when it resumes it
compacts again (or reuses its stored compacted prefix) and re-prefills its tail and its own output over
it.
"""

from __future__ import annotations

import re
import threading

import pytest

pytestmark = pytest.mark.server

B_TOKENS_BEFORE_A = 100  # B then holds 4 of the 11 blocks


def _preemptions(log: str) -> list[str]:
    """The phases in which the log's requests were preempted (for the failure message)."""
    return re.findall(r"preempted in compaction phase (\w+)", log)


def _complete(server, prompt, max_tokens, xargs=None, **extra):
    body = {"ignore_eos": True, **extra}
    if xargs:
        body["vllm_xargs"] = xargs
    return server.client().completions.create(
        model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body
    ).choices[0].text


def test_a_compacted_request_preempted_and_resumed_answers_as_if_never_preempted(tiny_pool_server, tokenizer, document):
    server = tiny_pool_server
    total = server.metrics()["kv_total_blocks"]
    ids = tokenizer(document * 6)["input_ids"]  # ~3700 tokens
    a_prompt, b_prompt = ids[1000:1400], ids[3000:3300]
    # Selection only (no refit): robust to last-bit differences between prefill chunkings.
    xargs = {"am_ratio": 0.1, "am_method": "snapkv"}
    expected = _complete(server, a_prompt, 500, xargs, cache_salt="alone")

    log_start = len(server.log())
    compactions = server.metrics()["compactions"]
    b_decoding = threading.Event()
    b_tokens = [0]
    errors: list[BaseException] = []

    def plain_b():
        try:
            stream = server.client().completions.create(
                model="smollm2", prompt=b_prompt, max_tokens=800, temperature=0, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True, "cache_salt": "storm"},
            )
            for chunk in stream:
                if chunk.usage is not None:
                    b_tokens[0] = chunk.usage.completion_tokens
                if b_tokens[0] >= B_TOKENS_BEFORE_A:
                    b_decoding.set()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            b_decoding.set()

    b = threading.Thread(target=plain_b)
    b.start()
    assert b_decoding.wait(timeout=300)
    resumed = _complete(server, a_prompt, 500, xargs, cache_salt="storm")
    b.join()
    assert not errors
    phases = _preemptions(server.log()[log_start:])
    assert "applied" in phases, f"A must be preempted after its compaction is applied; preemptions: {phases}"
    assert server.metrics()["compactions"] >= compactions + 1
    assert resumed == expected
    assert server.wait_idle_free_blocks(expected=total) == total
