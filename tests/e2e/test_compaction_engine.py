"""Compaction inside the real engine: identity, isolation, memory, and parity with an independent forward."""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path

import pytest
import torch

from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama

pytestmark = pytest.mark.server

BLOCK_SIZE = 128  # vLLM's CPU default


def _complete(server, prompt, xargs=None, max_tokens=16, logprobs=None, **extra):
    body = dict(extra)
    if xargs:
        body["vllm_xargs"] = xargs
    return server.client().completions.create(
        model="smollm2",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=logprobs,
        extra_body=body or None,
    )


def _token_ids(choice) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]


def _compaction_lines(server) -> list[re.Match]:
    pattern = r"compacted request (\S+): T=(\d+) -> t=(\d+) \(span (\d+) -> (\d+).*blocks (\d+) -> (\d+)"
    return list(re.finditer(pattern, server.log()))


def test_ratio_one_reproduces_uncompacted_tokens(plugin_server, document):
    plain = _complete(plugin_server, document, max_tokens=24).choices[0].text
    before = len(_compaction_lines(plugin_server))
    same = _complete(plugin_server, document, {"am_ratio": 1.0}, max_tokens=24).choices[0].text
    assert len(_compaction_lines(plugin_server)) == before + 1  # the compaction path really ran
    assert same == plain


def test_uncompacted_requests_match_stock_vllm_alone_and_batched(plugin_server, stock_server, document):
    prompts = [document[:1500], "The quick brown fox", document[1000:2400]]
    stock = [_complete(stock_server, p, max_tokens=20).choices[0].text for p in prompts]
    alone = [_complete(plugin_server, p, max_tokens=20).choices[0].text for p in prompts]
    assert alone == stock

    # Same requests while compacting requests run in the same batches.
    results: dict[int, str] = {}

    def run(i, prompt, xargs):
        results[i] = _complete(plugin_server, prompt, xargs, max_tokens=20).choices[0].text

    threads = [threading.Thread(target=run, args=(i, p, None)) for i, p in enumerate(prompts)]
    threads += [
        threading.Thread(target=run, args=(10 + i, document[i * 300 :], {"am_ratio": 0.1, "am_method": m}))
        for i, m in enumerate(["highest_attention", "snapkv"])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == stock


def test_compaction_frees_blocks_and_pool_returns_to_start(plugin_server, document):
    start_free = plugin_server.wait_idle_free_blocks()
    assert start_free > 0
    # A streaming compacting request: observe the pool while it decodes from the compacted cache.
    stream = plugin_server.client().completions.create(
        model="smollm2", prompt=document, max_tokens=400, temperature=0, stream=True,
        extra_body={"vllm_xargs": {"am_ratio": 0.1}, "ignore_eos": True},
    )
    chunks = 0
    for _ in stream:
        chunks += 1
        if chunks == 8:
            break
    line = _compaction_lines(plugin_server)[-1]
    T, t, before_blocks, after_blocks = int(line[2]), int(line[3]), int(line[6]), int(line[7])
    assert before_blocks == math.ceil(T / BLOCK_SIZE)
    assert after_blocks == math.ceil(t / BLOCK_SIZE)  # t already counts keep_first + keep_last
    running_free = plugin_server.metrics()["kv_free_blocks"]
    # The request holds its compacted blocks (plus at most one more for the tokens decoded so far).
    assert start_free - running_free <= after_blocks + 1 < before_blocks
    stream.close()  # client disconnect → abort

    # A mixed run with more aborts and normal finishes.
    for xargs in ({"am_ratio": 0.2}, None, {"am_target_tokens": 40, "am_method": "h2o"}):
        s = plugin_server.client().completions.create(
            model="smollm2", prompt=document[200:], max_tokens=300, temperature=0, stream=True,
            extra_body={"vllm_xargs": xargs, "ignore_eos": True} if xargs else {"ignore_eos": True},
        )
        for i, _ in enumerate(s):
            if i == 3:
                break
        s.close()
    _complete(plugin_server, document, {"am_ratio": 0.05}, max_tokens=8)
    assert plugin_server.wait_idle_free_blocks(expected=start_free) == start_free


def _layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def test_compacted_decode_matches_independent_reference(plugin_server, document, tokenizer, model_dir):
    prompt_ids = tokenizer(document)["input_ids"]
    dumps_before = set(plugin_server.dump_dir.glob("*.pt"))
    reply = _complete(
        plugin_server, prompt_ids, {"am_ratio": 0.2}, max_tokens=12, logprobs=1,
        return_tokens_as_token_ids=True,
    )
    choice = reply.choices[0]
    generated = _token_ids(choice)
    vllm_logprobs = choice.logprobs.token_logprobs
    new_dumps = set(plugin_server.dump_dir.glob("*.pt")) - dumps_before
    assert len(new_dumps) == 1
    dump = torch.load(next(iter(new_dumps)), weights_only=False)
    layout = dump["layout"]
    assert layout.num_tokens == len(prompt_ids) and layout.physical_len < len(prompt_ids)

    ref = ReferenceLlama.from_pretrained(model_dir)
    logits, full_cache, _ = ref.prefill(prompt_ids)
    assert int(logits[-1].argmax()) == generated[0]
    cache = []
    for i, full in enumerate(full_cache):
        entry = dump["layers"][_layer_name(i)]
        first = layout.keep_first
        # The raw ranges vLLM kept are the model's own KV (checks the paged-layout gather).
        torch.testing.assert_close(entry["keys"][:, :first].float(), full.keys[:, :first], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(
            entry["values"][:, -layout.tail_tokens :].float(), full.values[:, layout.span_end :], atol=2e-3, rtol=1e-3
        )
        cache.append(LayerKV(entry["keys"].float(), entry["values"].float(), entry["beta"].float()))

    # Teacher-force vLLM's tokens at logical positions T, T+1, ... over the compacted cache.
    pristine = [c.clone() for c in cache]  # forward() appends to the cache it is given
    ref_logits = ref.forward(generated[:-1], cache, start_position=len(prompt_ids))
    ref_logprobs = torch.log_softmax(ref_logits.float(), dim=-1)
    for k in range(1, len(generated)):
        assert int(ref_logits[k - 1].argmax()) == generated[k], f"greedy token {k} differs"
        assert abs(float(ref_logprobs[k - 1, generated[k]]) - vllm_logprobs[k]) <= 1e-3

    # Negative control: the same cache at physical positions must not match as well.
    wrong = ref.forward(generated[:-1], pristine, start_position=layout.physical_len)
    wrong_lp = torch.log_softmax(wrong.float(), dim=-1)
    assert max(abs(float(wrong_lp[k - 1, generated[k]]) - vllm_logprobs[k]) for k in range(1, len(generated))) > 1e-2
