"""Online compaction: a long generation under a KV ceiling (``am_max_kv_tokens``) is paused and
re-compacted whenever its KV reaches the ceiling, and runs to completion."""

from __future__ import annotations

import re
import threading

import pytest

pytestmark = pytest.mark.server

CEILING = 512
BLOCK = 128  # the CPU backend's block size


def _complete(server, prompt, max_tokens, xargs=None, **extra):
    body = dict(extra)
    if xargs:
        body["vllm_xargs"] = xargs
    return server.client().completions.create(
        model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body or None
    )


def _online_lines(log: str, request_id_prefix: str = "") -> tuple[list[int], list[tuple[int, int, int]]]:
    """(physical lengths at each online compaction, (ceiling, peak, count) of each finished request)."""
    sizes = [int(m.group(1)) for m in re.finditer(r"\(online #\d+, logical length \d+\): T=(\d+) ->", log)]
    finished = [
        tuple(int(g) for g in m.groups())
        for m in re.finditer(r"KV ceiling (\d+), peak KV entries (\d+), (\d+) online compactions", log)
    ]
    return sizes, finished


def test_long_generation_under_a_ceiling_compacts_repeatedly_and_completes(plugin_server, stock_server, document):
    prompt = document[:1400]  # ~310 tokens: the ceiling is first reached during decode
    neighbour_prompt = document[1400:2400]
    expected_neighbour = _complete(stock_server, neighbour_prompt, 24).choices[0].text
    before = plugin_server.metrics()
    log_start = len(plugin_server.log())
    free = plugin_server.wait_idle_free_blocks()
    neighbour = {}

    def run_neighbour():  # an uncompacted request batched with the online one sees nothing of it
        neighbour["text"] = _complete(plugin_server, neighbour_prompt, 24).choices[0].text

    thread = threading.Thread(target=run_neighbour)
    thread.start()
    result = _complete(plugin_server, prompt, 700, {"am_max_kv_tokens": CEILING}, ignore_eos=True)
    thread.join()
    after = plugin_server.metrics()
    assert result.usage.completion_tokens == 700 and result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens + 700 > CEILING + 2 * 222  # logically far past the ceiling
    assert after["online_compactions"] - before["online_compactions"] >= 3
    assert after["failures"] == before["failures"]
    sizes, finished = _online_lines(plugin_server.log()[log_start:])
    assert len(sizes) >= 3 and all(CEILING <= s <= CEILING + BLOCK for s in sizes), sizes
    assert len(finished) == 1
    ceiling, peak, count = finished[0]
    assert ceiling == CEILING and peak <= CEILING + BLOCK and count == len(sizes)
    assert neighbour["text"] == expected_neighbour
    assert plugin_server.wait_idle_free_blocks(expected=free) == free


def test_long_prompt_is_prefilled_in_pieces_that_stop_at_the_ceiling(plugin_server, stock_server, document):
    """A prompt longer than the ceiling: each prefill chunk stops at the ceiling and is compacted. The
    blocks vLLM registered for the uncut chunk were never written: a later plain request with the same
    prompt must not read them as prefix-cache hits."""
    prompt = document + " Thus"
    log_start = len(plugin_server.log())
    result = _complete(plugin_server, prompt, 4, {"am_max_kv_tokens": 256})
    assert result.usage.prompt_tokens > 2 * 256
    sizes, finished = _online_lines(plugin_server.log()[log_start:])
    assert len(sizes) >= 2 and all(256 <= s <= 256 + BLOCK for s in sizes), sizes
    assert finished and finished[0][1] <= 256 + BLOCK
    assert _complete(plugin_server, prompt, 12).choices[0].text == _complete(stock_server, prompt, 12).choices[0].text


def test_prefill_cut_before_whole_blocks_leaves_no_stale_prefix_cache_entries(plugin_server, stock_server, document):
    """am_keep_last of several blocks: the prompt's chunk stops at the span end with whole blocks after
    it; those blocks must not stay registered (unwritten) in the prefix cache after the swap."""
    prompt = document + " Hence"
    _complete(plugin_server, prompt, 4, {"am_ratio": 0.2, "am_keep_last": 300})
    assert _complete(plugin_server, prompt, 12).choices[0].text == _complete(stock_server, prompt, 12).choices[0].text


def test_failed_online_compaction_serves_the_request_uncompacted_once(plugin_server, document):
    prompt = document[:1400]
    plain = _complete(plugin_server, prompt, 8).choices[0].text
    before = plugin_server.metrics()
    served = _complete(plugin_server, prompt, 8, {"am_max_kv_tokens": 256, "attnmatch_fault": "solver"})
    after = plugin_server.metrics()
    assert served.choices[0].text == plain
    assert after["failures"] == before["failures"] + 1  # one failure, then no retry loop
    assert after["online_compactions"] == before["online_compactions"]


@pytest.mark.parametrize("source", ["repeat", "self_study"])
def test_synthetic_query_sources_compact_without_emitting_tokens(plugin_server, document, source):
    """repeat / self_study queries are produced on the worker over the request's own KV: the request is
    compacted with them, and the client sees only its own completion."""
    before = plugin_server.metrics()
    log_start = len(plugin_server.log())
    result = _complete(plugin_server, document, 8, {"am_ratio": 0.1, "am_queries": source})
    after = plugin_server.metrics()
    assert result.usage.completion_tokens == 8 and len(result.choices) == 1
    assert after["compactions"] == before["compactions"] + 1 and after["failures"] == before["failures"]
    assert after["reference_query_seconds"] > before["reference_query_seconds"]
    assert f"queries {source})" in plugin_server.log()[log_start:]
