"""A compaction never freezes the batch: it runs a slice of layers per engine step while the compacting
request is held out, and every other request keeps decoding. Counted in engine steps (tokens of a
decoding neighbour), never in seconds; the seconds are in ``benchmarks/suites/stall.py``."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading

import pytest

from vllm_attnmatch.config import ServerConfig

pytestmark = pytest.mark.server


class Neighbour:
    """A streamed greedy request that decodes in the background; ``count`` is its tokens so far.

    Counted from the usage the server reports with every chunk, not from the number of chunks: when the
    API server falls behind the engine, vLLM merges several steps' tokens into one chunk."""

    def __init__(self, server, prompt: str, max_tokens: int) -> None:
        self.count = 0
        self.text = ""
        self.error: BaseException | None = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(server, prompt, max_tokens))
        self._thread.start()

    def _run(self, server, prompt, max_tokens) -> None:
        try:
            stream = server.client().completions.create(
                model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True},
            )
            for chunk in stream:
                if chunk.choices:
                    self.text += chunk.choices[0].text
                if chunk.usage is not None:
                    self.count = chunk.usage.completion_tokens
                    if self.count >= 4:
                        self.started.set()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.started.set()

    def join(self) -> None:
        self._thread.join()
        assert self.error is None


def _num_layers(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def test_a_decoding_neighbour_keeps_decoding_while_a_request_compacts(
    plugin_server, stock_server, model_dir, tokenizer, document
):
    server = plugin_server
    total = server.metrics()["kv_total_blocks"]
    prompt = "Once upon a time, in a small village by the sea,"
    neighbour = Neighbour(server, prompt, max_tokens=240)
    assert neighbour.started.wait(timeout=300)
    before = server.metrics()["compactions"]
    long_prompt = tokenizer(document * 3)["input_ids"][:1500]
    at_send = neighbour.count
    server.client().completions.create(
        model="smollm2", prompt=long_prompt, max_tokens=1, temperature=0,
        extra_body={"vllm_xargs": {"am_ratio": 0.1}, "cache_salt": "no-stall"},
    )
    during = neighbour.count - at_send
    neighbour.join()
    assert server.metrics()["compactions"] == before + 1
    # The job runs over at least layers / layers_per_step steps after the one that ships it, and the
    # neighbour gets a token on each of them (a compaction inside one step gave it ~3 tokens here).
    steps_in_flight = -(-_num_layers(model_dir) // ServerConfig().compaction_layers_per_step)
    assert during >= steps_in_flight, f"the neighbour got {during} tokens while the request compacted"
    # ...and it is served exactly as stock vLLM would serve it.
    stock = stock_server.client().completions.create(
        model="smollm2", prompt=prompt, max_tokens=240, temperature=0, extra_body={"ignore_eos": True}
    ).choices[0].text
    assert neighbour.text == stock
    assert server.wait_idle_free_blocks(expected=total) == total


def test_aborting_a_request_while_its_compaction_is_in_flight_frees_every_block(plugin_server, tokenizer, document):
    server = plugin_server
    total = server.metrics()["kv_total_blocks"]
    cancelled = server.log().count("compaction cancelled in flight")
    # A decoding neighbour paces the engine steps: the long request's prefill is one step, then its
    # job is in flight for layers / layers_per_step steps; its client disconnects a few neighbour tokens
    # in (vLLM aborts a request whose client disconnects).
    neighbour = Neighbour(server, "The quick brown fox", max_tokens=400)
    assert neighbour.started.wait(timeout=300)
    body = json.dumps({
        "model": "smollm2", "prompt": tokenizer(document * 3)["input_ids"][:1500], "max_tokens": 8,
        "temperature": 0, "vllm_xargs": {"am_ratio": 0.1}, "cache_salt": "abort-in-flight",
    })
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    at_send = neighbour.count
    answered = False
    while neighbour.count < at_send + 6 and neighbour.error is None and not answered:
        answered = bool(select.select([conn.sock], [], [], 0.05)[0])
    assert not answered, "the compacting request answered before it could be aborted"
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    neighbour.join()
    assert server.wait_idle_free_blocks(expected=total) == total
    assert server.log().count("compaction cancelled in flight") == cancelled + 1
