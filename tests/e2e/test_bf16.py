"""The plugin in bfloat16 (the dtype GPUs serve in), on this machine's CPU KV layout.

One extra server (``--dtype bfloat16``), short prompts: parity of compacted decoding with the independent
pure-torch forward fed the same compacted cache, compacted-prefix reuse, and online compaction. Dtype bugs
(a cast lost between the cache, the fit and the biased attention) must show here before a GPU sees them.
"""

from __future__ import annotations

import pytest
import torch

from harness.server import Server
from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama

pytestmark = pytest.mark.server

CONFIG = {"attnmatch": {"preset": "default"}}
BLOCK = 128  # the CPU backend's block size
DOC_TOKENS = 512  # four blocks: the compacted span of the reuse test ends at the document's end

# bf16 has an 8-bit mantissa: vLLM's bf16 forward over the compacted cache and the fp32 reference fed the
# same cache differ by a few 1e-2 in log-probs (measured: max 0.068, mean 0.025 over 12 tokens). The bound
# is about twice that; reading the same cache at the wrong (physical) positions must be off by 3× more.
LOGPROB_ATOL = 0.15


@pytest.fixture(scope="module")
def bf16_server(model_dir):
    server = Server("bf16", model_dir, CONFIG, ["--enforce-eager", "--dtype", "bfloat16"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _complete(server, prompt, max_tokens, xargs=None, logprobs=None, **extra):
    body = dict(extra)
    if xargs:
        body["vllm_xargs"] = xargs
    return server.client().completions.create(
        model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=logprobs,
        extra_body=body or None,
    )


def test_server_runs_in_bfloat16(bf16_server):
    log = bf16_server.log()
    assert "dtype=torch.bfloat16" in log
    assert "vllm-attnmatch" in log and "active (worker rank 0" in log


def test_bf16_compacted_decode_matches_independent_reference(bf16_server, document, tokenizer, model_dir):
    prompt_ids = tokenizer(document)["input_ids"]
    dumps_before = set(bf16_server.dump_dir.glob("*.pt"))
    reply = _complete(bf16_server, prompt_ids, 12, {"am_ratio": 0.2}, logprobs=1, return_tokens_as_token_ids=True)
    choice = reply.choices[0]
    generated = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    vllm_logprobs = choice.logprobs.token_logprobs
    new_dumps = set(bf16_server.dump_dir.glob("*.pt")) - dumps_before
    assert len(new_dumps) == 1
    dump = torch.load(next(iter(new_dumps)), weights_only=False)
    layout = dump["layout"]
    span_end, first = layout.span_end, layout.keep_first
    assert layout.physical_len < span_end < len(prompt_ids)

    ref = ReferenceLlama.from_pretrained(model_dir)
    _, prefix_cache, _ = ref.prefill(prompt_ids[:span_end])
    cache = []
    for i, full in enumerate(prefix_cache):
        entry = dump["layers"][f"model.layers.{i}.self_attn.attn"]
        assert entry["keys"].dtype == torch.bfloat16  # the compacted cache is stored in the model's dtype
        # The raw head vLLM kept is the model's own KV, up to bf16 rounding of a 30-layer forward.
        for name in ("keys", "values"):
            got, want = entry[name][:, :first], getattr(full, name)[:, :first]
            assert float((got.float() - want).norm() / want.norm()) < 0.05, f"layer {i}"
        assert torch.isinf(entry["beta"][:, first + layout.target :]).all()  # padding
        assert torch.isfinite(entry["beta"][:, :first + layout.target]).all()
        cache.append(LayerKV(entry["keys"].float(), entry["values"].float(), entry["beta"].float()))
    pristine = [c.clone() for c in cache]

    rest = prompt_ids[span_end:]
    ref_logits = ref.forward(rest + generated[:-1], cache, start_position=span_end)[len(rest) - 1 :]
    ref_logprobs = torch.log_softmax(ref_logits.float(), dim=-1)
    diffs = [abs(float(ref_logprobs[k, tok]) - vllm_logprobs[k]) for k, tok in enumerate(generated)]
    print(f"bf16 parity: max |Δ logprob| {max(diffs):.4f}, mean {sum(diffs) / len(diffs):.4f}")
    assert max(diffs) <= LOGPROB_ATOL, diffs
    for k, token in enumerate(generated):
        top2 = ref_logprobs[k].topk(2).values
        if float(top2[0] - top2[1]) > 2 * LOGPROB_ATOL:  # not a near-tie at bf16 precision
            assert int(ref_logits[k].argmax()) == token, f"greedy token {k} differs"

    # Negative control: the same cache read at physical positions is far off.
    wrong = ref.forward(rest + generated[:-1], pristine, start_position=layout.physical_len)[len(rest) - 1 :]
    wrong_lp = torch.log_softmax(wrong.float(), dim=-1)
    assert max(abs(float(wrong_lp[k, tok]) - vllm_logprobs[k]) for k, tok in enumerate(generated)) > 3 * LOGPROB_ATOL


def _ask_stream(server, prompt_ids, xargs, salt):
    stream = server.client().completions.create(
        model="smollm2", prompt=prompt_ids, max_tokens=12, temperature=0, stream=True,
        extra_body={"vllm_xargs": xargs, "cache_salt": salt},
    )
    return "".join(chunk.choices[0].text for chunk in stream if chunk.choices)


def test_bf16_second_question_reuses_the_compacted_document(bf16_server, tokenizer, document):
    doc = tokenizer(document)["input_ids"][:DOC_TOKENS]
    q1, q2 = (tokenizer(f"\n\nQuestion: {q}\nAnswer:")["input_ids"] for q in (
        "who may copy and distribute this license, and under which conditions?",
        "what does the word 'free' refer to in this text, and why does it matter?",
    ))
    assert all(16 <= len(q) < BLOCK for q in (q1, q2))  # longer than the kept tail: the span ends at the document
    xargs = {"am_ratio": 0.2}
    before = bf16_server.metrics()
    _ask_stream(bf16_server, doc + q1, xargs, "bf16-reuse")
    after_first = bf16_server.metrics()
    assert after_first["compactions"] == before["compactions"] + 1
    reused = _ask_stream(bf16_server, doc + q2, xargs, "bf16-reuse")
    after_second = bf16_server.metrics()
    assert after_second["prefix_hits"] == after_first["prefix_hits"] + 1
    assert after_second["prefill_tokens_saved"] == after_first["prefill_tokens_saved"] + DOC_TOKENS
    assert after_second["compactions"] == after_first["compactions"]
    # A fresh compaction of the same document (another salt cannot hit) gives the same tokens.
    assert _ask_stream(bf16_server, doc + q2, xargs, "bf16-fresh") == reused
    assert bf16_server.metrics()["failures"] == before["failures"]


def test_bf16_online_generation_under_a_ceiling_compacts_repeatedly(bf16_server, document):
    ceiling, max_tokens = 256, 300
    free = bf16_server.wait_idle_free_blocks()
    before = bf16_server.metrics()
    result = _complete(bf16_server, document[:900], max_tokens, {"am_max_kv_tokens": ceiling}, ignore_eos=True)
    after = bf16_server.metrics()
    assert result.usage.completion_tokens == max_tokens and result.choices[0].finish_reason == "length"
    assert after["online_compactions"] - before["online_compactions"] >= 2
    assert after["failures"] == before["failures"]
    assert bf16_server.wait_idle_free_blocks(expected=free) == free
