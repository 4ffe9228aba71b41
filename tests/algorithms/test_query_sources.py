"""The synthetic reference-query sources on the bundled model (``am_queries`` repeat / self_study)."""

import pytest
import torch

from vllm_attnmatch.worker.query_sources import repeat_queries, self_study_queries

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def setup(bundled):
    ids = bundled.ids[:96]
    _, cache, _ = bundled.model.prefill(ids)
    return bundled.model, bundled.tokenizer, ids, cache


def test_repeat_queries_are_those_of_the_repeated_copy_after_the_context(setup):
    model, tok, ids, cache = setup
    prompt = tok("\nRepeat the previous context verbatim.\n", add_special_tokens=False)["input_ids"]
    made = repeat_queries(model, cache, ids, prompt, max_tokens=40)
    start = len(ids) + len(prompt)
    assert torch.equal(made.positions, torch.arange(start, start + 40))
    # The same queries as one causal prefill of context + prompt + copy, and the cache is untouched.
    _, _, whole = model.prefill(ids + prompt + ids[:40])
    for layer in (0, 15, 29):
        assert torch.allclose(made.queries[layer], whole[layer][start:], atol=2e-4)
    assert len(cache[0]) == len(ids)


def test_self_study_generates_within_its_token_and_time_bounds(setup):
    model, tok, ids, cache = setup
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("\nSummarize the text.\n", "\nKey facts:\n")]
    made = self_study_queries(model, cache, len(ids), prompts, max_new_tokens=6, max_seconds=60)
    assert made.tokens == sum(len(p) for p in prompts) + 2 * 6
    assert made.queries[0].shape == (made.tokens, model.num_heads, model.head_dim)
    assert made.positions.min() == len(ids) and len(made.info["answers"]) == 2
    bounded = self_study_queries(model, cache, len(ids), prompts, max_new_tokens=1000, max_seconds=0.5)
    assert bounded.tokens < sum(len(p) for p in prompts) + 2 * 1000
