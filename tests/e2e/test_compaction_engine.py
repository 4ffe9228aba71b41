"""Compaction inside the real engine: identity, isolation, memory, and parity with an independent forward."""

from __future__ import annotations

import math
import re
import threading

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


def test_compaction_frees_blocks_and_pool_returns_to_start(plugin_server, document, tokenizer):
    prompt_len = len(tokenizer(document)["input_ids"])
    start_free = plugin_server.wait_idle_free_blocks()
    assert start_free > 0
    # A streaming compacting request: observe the pool while it decodes from the compacted cache.
    stream = plugin_server.client().completions.create(
        model="smollm2", prompt=document, max_tokens=400, temperature=0, stream=True,
        extra_body={"vllm_xargs": {"am_ratio": 0.1}, "ignore_eos": True},
    )
    generated = 0
    for _ in stream:
        generated += 1
        if generated == 8:
            break
    line = _compaction_lines(plugin_server)[-1]
    span_end, t, after_blocks = int(line[2]), int(line[3]), int(line[7])
    assert after_blocks == math.ceil(t / BLOCK_SIZE)  # t = kept head + compacted span + padding
    held = start_free - plugin_server.metrics()["kv_free_blocks"]
    tail = prompt_len - span_end + generated
    # The compacted prefix blocks plus the raw tail's blocks (one more if a decode step is in flight).
    assert after_blocks + math.ceil(tail / BLOCK_SIZE) <= held <= after_blocks + math.ceil((tail + 1) / BLOCK_SIZE)
    assert held < math.ceil((prompt_len + generated) / BLOCK_SIZE)
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
    span_end, first = layout.span_end, layout.keep_first
    assert layout.num_tokens == span_end < len(prompt_ids) and layout.physical_len < span_end

    ref = ReferenceLlama.from_pretrained(model_dir)
    _, prefix_cache, _ = ref.prefill(prompt_ids[:span_end])
    cache = []
    for i, full in enumerate(prefix_cache):
        entry = dump["layers"][_layer_name(i)]
        # The raw head vLLM kept is the model's own KV (checks the paged-layout gather).
        torch.testing.assert_close(entry["keys"][:, :first].float(), full.keys[:, :first], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(entry["values"][:, :first].float(), full.values[:, :first], atol=2e-3, rtol=1e-3)
        assert torch.isinf(entry["beta"][:, layout.keep_first + layout.target :]).all()  # padding
        cache.append(LayerKV(entry["keys"].float(), entry["values"].float(), entry["beta"].float()))
    pristine = [c.clone() for c in cache]  # forward() appends to the cache it is given

    # The rest of the prompt, then vLLM's tokens (teacher-forced), at logical positions from span_end.
    rest = prompt_ids[span_end:]
    ref_logits = ref.forward(rest + generated[:-1], cache, start_position=span_end)[len(rest) - 1 :]
    ref_logprobs = torch.log_softmax(ref_logits.float(), dim=-1)
    for k, token in enumerate(generated):
        assert int(ref_logits[k].argmax()) == token, f"greedy token {k} differs"
        assert abs(float(ref_logprobs[k, token]) - vllm_logprobs[k]) <= 1e-3

    # Negative control: the same cache at physical positions must not match as well.
    wrong = ref.forward(rest + generated[:-1], pristine, start_position=layout.physical_len)[len(rest) - 1 :]
    wrong_lp = torch.log_softmax(wrong.float(), dim=-1)
    assert max(abs(float(wrong_lp[k, tok]) - vllm_logprobs[k]) for k, tok in enumerate(generated)) > 1e-2
