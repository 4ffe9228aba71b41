"""The plugin inside the real server: loading, inertness, normal answers, bad input → HTTP 400."""

from __future__ import annotations

import re

import openai
import pytest

from harness.server import Server

pytestmark = pytest.mark.server


def _chat(server, content: str, xargs: dict | None = None, max_tokens: int = 16):
    return server.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"vllm_xargs": xargs} if xargs else None,
    )


def test_plugin_is_active_in_api_server_engine_core_and_worker(plugin_server):
    log = plugin_server.log()
    assert re.search(r"\(APIServer pid=\d+\).*vllm-attnmatch \S+ enabled \(api server", log)
    assert re.search(r"\(EngineCore pid=\d+\).*vllm-attnmatch \S+ active \(engine core\)", log)
    # Logged by the worker process itself, after it registered the attention backend.
    worker_line = re.search(r"\((?:VllmWorker-0|Worker) pid=(\d+)\).*vllm-attnmatch \S+ active \(worker rank 0, pid (\d+)\)", log)
    assert worker_line and worker_line.group(1) == worker_line.group(2)
    assert "Using custom scheduler class vllm_attnmatch.engine.scheduler.AttnMatchScheduler" in log


def test_chat_without_am_keys_answers_normally(plugin_server):
    reply = _chat(plugin_server, "What is the capital of France?")
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.parametrize(
    "xargs, key",
    [
        ({"am_ratio": 0}, "am_ratio"),
        ({"am_ratio": 1.5}, "am_ratio"),
        ({"am_ratio": -0.1}, "am_ratio"),
        ({"am_ratio": "0.1"}, "am_ratio"),
        ({"am_target_tokens": 0}, "am_target_tokens"),
        ({"am_target_tokens": 2.5}, "am_target_tokens"),
        ({"am_method": "kmeans"}, "am_method"),
        ({"am_queries": "oracle"}, "am_queries"),
        ({"am_keep_first": -1}, "am_keep_first"),
        ({"am_chunk_tokens": 1}, "am_chunk_tokens"),
        ({"am_ratio": 0.1, "am_target_tokens": 10}, "am_ratio"),
        ({"am_ration": 0.1}, "am_ration"),
    ],
)
def test_bad_am_values_are_refused_with_400_naming_the_key(plugin_server, xargs, key):
    with pytest.raises(openai.BadRequestError) as err:
        _chat(plugin_server, "Hello", xargs)
    assert err.value.status_code == 400
    assert key in str(err.value)
    assert "allowed" in str(err.value)


@pytest.mark.parametrize(
    "raw_xargs, key",
    [
        ('{"am_ratio": NaN}', "am_ratio"),
        ('{"am_ratio": Infinity}', "am_ratio"),
        ('{"am_target_tokens": 99999999999}', "am_target_tokens"),
        ('{"am_ratio": [0.1, 0.2]}', "am_ratio"),
        ('{"am_keep_last": true, "am_method": "omp", "am_queries": ""}', "am_queries"),
    ],
)
def test_non_finite_huge_and_list_values_are_refused_naming_the_key(plugin_server, raw_xargs, key):
    import requests

    body = '{"model": "smollm2", "prompt": "Hello", "max_tokens": 2, "vllm_xargs": %s}' % raw_xargs
    response = requests.post(
        plugin_server.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 400
    assert key in response.text


def test_am_keys_with_beam_search_are_refused_naming_the_key(plugin_server):
    with pytest.raises(openai.BadRequestError) as err:
        plugin_server.client().completions.create(
            model="smollm2", prompt="Hello", max_tokens=4, n=2,
            extra_body={"use_beam_search": True, "vllm_xargs": {"am_ratio": 0.5}},
        )
    assert "am_ratio" in str(err.value) and "beam search" in str(err.value)
    # Beam search itself still works.
    reply = plugin_server.client().completions.create(
        model="smollm2", prompt="Hello", max_tokens=4, n=2, extra_body={"use_beam_search": True}
    )
    assert len(reply.choices) == 2


def test_server_keeps_serving_after_bad_requests(plugin_server):
    with pytest.raises(openai.BadRequestError):
        _chat(plugin_server, "Hello", {"am_method": "nope"})
    reply = _chat(plugin_server, "What is the capital of France?")
    assert "Paris" in reply.choices[0].message.content


@pytest.mark.parametrize(
    "section, key",
    [({"ratio": 7}, "attnmatch.ratio"), ({"methd": "omp"}, "attnmatch.methd"), ({"preset": "turbo"}, "attnmatch.preset")],
)
def test_bad_additional_config_refuses_to_start_with_one_clear_message(model_dir, section, key):
    server = Server("badconfig", model_dir, {"attnmatch": section}, ["--enforce-eager"], config_via="additional-config")
    try:
        assert server.proc.wait(timeout=300) != 0
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert re.search(rf"ConfigError: {re.escape(key)}: .*allowed", log), log[-2000:]


def test_metrics_are_exported(plugin_server):
    metrics = plugin_server.metrics()
    for name in ("compactions", "failures", "tokens_before", "tokens_after", "compaction_seconds"):
        assert name in metrics


def test_without_attnmatch_section_the_server_is_stock_vllm(stock_server):
    log = stock_server.log()
    assert not re.search(r"vllm-attnmatch [0-9.]+ (enabled|active)", log)
    assert "Using custom scheduler class" not in log
    # am_* keys mean nothing to stock vLLM: accepted and ignored, not validated.
    reply = _chat(stock_server, "What is the capital of France?", {"am_ratio": 0})
    assert "Paris" in reply.choices[0].message.content
    assert stock_server.metrics() == {}
