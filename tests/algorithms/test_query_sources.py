"""The synthetic reference-query sources on the bundled model (``am_queries`` repeat / self_study)."""

import pytest
import torch

from vllm_attnmatch.worker.query_sources import (
    PROMPT_FAMILIES,
    RECALL_TOKENS,
    Prompt,
    build_prompts,
    repeat_queries,
    self_study_batched,
    self_study_queries,
)

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


def test_repeat_source_scores_each_context_key_by_its_largest_attention_over_the_whole_copy(setup):
    model, tok, ids, cache = setup
    prompt = tok("\nRepeat the previous context verbatim.\n", add_special_tokens=False)["input_ids"]
    made = repeat_queries(model, cache, ids, prompt, max_tokens=40, key_scores=True)
    plain = repeat_queries(model, cache, ids, prompt, max_tokens=40)
    assert "key_scores" not in plain.info
    # Scoring asks the attention kernel for each query's log-sum-exp: the pass itself is unchanged.
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(made.queries, plain.queries))
    seq = ids + prompt + ids[:40]
    _, whole_cache, whole = model.prefill(seq)
    start = len(ids) + len(prompt)
    H, g = model.num_kv_heads, model.num_heads // model.num_kv_heads
    for layer in (0, 29):
        scores = made.info["key_scores"][layer]
        assert scores.shape == (H, len(ids))
        # By hand: every query head of the copy, softmax over everything it sees, max over the copy.
        q = whole[layer][start:]  # (40, H_q, d)
        k = whole_cache[layer].keys.repeat_interleave(g, 0)  # (H_q, L, d)
        logits = torch.einsum("nhd,hld->hnl", q, k) * model.scale
        pos = torch.arange(len(seq))
        logits.masked_fill_(pos[None, None, :] > torch.arange(start, len(seq))[None, :, None], float("-inf"))
        expected = torch.softmax(logits, -1)[:, :, : len(ids)].amax(1).view(H, g, -1).amax(1)
        assert torch.allclose(scores, expected, atol=1e-4)


def test_self_study_generates_within_its_token_and_time_bounds(setup):
    model, tok, ids, cache = setup
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("\nSummarize the text.\n", "\nKey facts:\n")]
    made = self_study_queries(model, cache, len(ids), prompts, max_new_tokens=6, max_seconds=3600)
    assert made.tokens == sum(len(p) for p in prompts) + 2 * 6
    assert made.queries[0].shape == (made.tokens, model.num_heads, model.head_dim)
    assert made.positions.min() == len(ids) and len(made.info["answers"]) == 2
    bounded = self_study_queries(model, cache, len(ids), prompts, max_new_tokens=1000, max_seconds=0.5)
    assert bounded.tokens < sum(len(p) for p in prompts) + 2 * 1000


def test_batched_self_study_gives_the_unbatched_queries_and_answers(setup):
    """All prompts decoded as one batch (left-padded, preallocated cache): same greedy answers, same
    queries in the same order as one prompt at a time."""
    model, tok, ids, cache = setup
    texts = ("\nSummarize the text.\n", "\nWrite three questions that the text above answers.\n", "\nFacts:\n")
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in texts]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    one = self_study_queries(model, cache, len(ids), prompts, max_new_tokens=5, max_seconds=3600)
    batched = self_study_batched(model, cache, [Prompt(tuple(p), len(ids)) for p in prompts], 5, 3600)
    assert batched.info["answers"] == one.info["answers"]
    assert torch.equal(batched.positions, one.positions) and batched.tokens == one.tokens
    for layer in range(model.num_layers):
        torch.testing.assert_close(batched.queries[layer], one.queries[layer], atol=2e-4, rtol=1e-4)
    assert len(cache[0]) == len(ids)  # the shared context cache is not modified


def test_batched_self_study_respects_its_time_bound(setup):
    model, tok, ids, cache = setup
    prompts = [Prompt(tuple(tok("\nSummarize.\n", add_special_tokens=False)["input_ids"]), len(ids))]
    bounded = self_study_batched(model, cache, prompts, max_new_tokens=1000, max_seconds=0.5)
    # Stops well before 1000 tokens (on a loaded machine possibly right after the prompt step).
    assert len(bounded.info["answers"][0]) < 1000 and bounded.tokens == len(prompts[0].ids) + len(bounded.info["answers"][0])


def test_continue_family_continues_the_text_itself(setup):
    """The ``continue`` row re-feeds the context's last token (its cached copy hidden) and goes on: its
    queries are those of one causal prefill of context + answer; recall rows restart inside the text."""
    model, tok, ids, cache = setup
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = build_prompts("continue", encode, ids)
    assert prompts[0] == Prompt((ids[-1],), len(ids) - 1, hide=1)
    assert all(p.start == len(ids) and set(ids) >= set(p.ids[-RECALL_TOKENS:]) for p in prompts[1:])
    made = self_study_batched(model, cache, prompts, max_new_tokens=6, max_seconds=3600)
    row, _, _ = made.info["rows"][0]
    _, _, whole = model.prefill(ids + row[1:])
    for layer in (0, 29):
        torch.testing.assert_close(made.queries[layer][: len(row)], whole[layer][len(ids) - 1 :], atol=2e-4, rtol=1e-4)
    assert set(PROMPT_FAMILIES) >= {"tasks", "continue", "mixed"}


def test_prompt_families_are_exactly_the_server_setting_choices():
    from typing import get_args

    from vllm_attnmatch.config import ServerConfig

    assert set(get_args(ServerConfig.model_fields["self_study_prompts"].annotation)) == set(PROMPT_FAMILIES)


def test_repeat_source_scores_whole_words_when_asked(setup):
    from vllm_attnmatch.algorithms.words import TokenPieces, word_ids, word_max
    from vllm_attnmatch.worker.query_sources import RepeatPass

    model, tok, ids, cache = setup
    prompt = tok("\nRepeat the previous context verbatim.\n", add_special_tokens=False)["input_ids"]
    words = word_ids(TokenPieces(tok.decode)(ids))
    assert words.max() < len(ids) - 1  # the text has words of several tokens
    by_token = RepeatPass(model, cache.__getitem__, ids, prompt, 40, key_scores=True)
    by_word = RepeatPass(model, cache.__getitem__, ids, prompt, 40, key_scores=True, words=words)
    for _ in range(model.num_layers):
        (q1, s1), (q2, s2) = by_token.next_layer(), by_word.next_layer()
        assert torch.equal(q1, q2) and torch.equal(s2, word_max(s1, words))
