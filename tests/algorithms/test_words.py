"""Whole words as the unit of selection (issue 18): a number's digits and a name's pieces share a score."""

from __future__ import annotations

import pytest
import torch

from vllm_attnmatch.algorithms import compact
from vllm_attnmatch.algorithms.highest_attention import HighestAttention
from vllm_attnmatch.algorithms.words import TokenPieces, word_ids, word_max

# SmolLM2's pieces of "Remember this: the code of Quentin is 912145. (c) 2007"
PIECES = ["Remember", " this", ":", " the", " code", " of", " Qu", "entin", " is", " ", "9", "1", "2", "1", "4", "5",
          ".", " (", "c", ")", " ", "2", "0", "0", "7"]


def test_digits_after_a_lone_space_and_a_names_pieces_are_one_word():
    words = word_ids(PIECES).tolist()
    assert words[6] == words[7] != words[5]  # " Qu" "entin"
    assert len({words[i] for i in range(9, 16)}) == 1 and words[8] != words[9]  # " " 9 1 2 1 4 5
    assert words[16] not in (words[15], words[17])  # "." is a word of its own
    assert words[18] != words[17] and words[19] != words[18]  # "(c)": punctuation splits
    assert words == sorted(words)


def test_each_token_takes_its_words_largest_score_per_head():
    words = word_ids(PIECES)
    scores = torch.rand(2, len(PIECES))
    scores[0, 12] = 5.0  # one digit of the number scores high in head 0 only
    grouped = word_max(scores, words)
    assert torch.all(grouped[0, 9:16] == 5.0) and grouped[1, 9:16].max() < 5.0
    for w in words.unique():
        members = words == w
        assert torch.all(grouped[:, members] == scores[:, members].amax(1, keepdim=True))
    with pytest.raises(ValueError, match="word ids"):
        word_max(scores, words[:-1])


def test_a_kept_digit_brings_the_whole_number():
    """Selection by word-grouped scores keeps the six digits together, where token scores keep one."""
    T, d = len(PIECES), 8
    g = torch.Generator().manual_seed(0)
    K, V, Q = torch.randn(1, T, d, generator=g), torch.randn(1, T, d, generator=g), torch.randn(1, 16, d, generator=g)
    scores = torch.linspace(0, 1, T)[None] * 0.1
    scores[0, 12] = 1.0
    r = compact(K, V, Q, 11, "highest_attention", key_scores=word_max(scores, word_ids(PIECES)),
                reduction="reconstruction", words=True, recent=0.0, sinks=4, causal=False)
    assert set(range(9, 16)) <= set(r.indices[0].tolist())


def test_words_need_the_reconstruction_score():
    with pytest.raises(ValueError, match="words: true needs reduction: reconstruction"):
        HighestAttention(words=True)


def test_token_pieces_decode_each_id_once():
    calls = []
    pieces = TokenPieces(lambda ids: calls.append(ids) or f"<{ids[0]}>")
    assert pieces([5, 7, 5]) == ["<5>", "<7>", "<5>"] and calls == [[5], [7]]
