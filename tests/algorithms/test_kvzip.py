"""KVzip's reconstruction score and selection by scores computed outside :func:`compact` (issue 18).

The cases are built so that KVzip's rule (the *largest* attention of any repetition query, softmax over
everything the query sees) and the plausible wrong ones (a sum over queries; a softmax over the block
alone) disagree.
"""

from __future__ import annotations

import torch

from vllm_attnmatch.algorithms import compact
from vllm_attnmatch.algorithms.kvzip import reconstruction_scores, reconstruction_scores_from_lse

D = 8


def _keys(L: int) -> torch.Tensor:
    """One KV head of ``L`` keys, key i along direction i % D (so a query can point at one key)."""
    K = torch.zeros(1, L, D)
    for i in range(L):
        K[0, i, i % D] = 1.0
    return K


def test_a_key_one_query_copies_outranks_a_key_every_query_glances_at():
    # Block of 6 keys; key 2 is attended sharply by one query, key 3 mildly by all of them.
    K = _keys(6)
    Q = torch.zeros(1, 4, D)
    Q[0, 0, 2] = 20.0  # one sharp copy of key 2
    Q[0, :, 3] += 1.5  # everyone glances at key 3
    pos = torch.full((4,), 5)
    s = reconstruction_scores(Q, K, pos, block_len=6, scale=1.0)
    assert s.shape == (1, 6)
    assert s[0, 2] > 0.99 and s[0, 2] > s[0, 3]
    summed = torch.softmax(Q @ K.transpose(1, 2), -1).sum(1)[0]
    assert summed[3] > summed[2]  # a sum over queries (H2O-like) would rank them the other way


def test_attention_is_normalised_over_the_whole_sequence_not_the_block():
    # Block = keys 0..3; the query mostly attends to key 5 (after the block): key 1 gets little of it.
    K = _keys(6)
    Q = torch.zeros(1, 1, D)
    Q[0, 0, 5] = 10.0
    Q[0, 0, 1] = 2.0
    s = reconstruction_scores(Q, K, torch.tensor([5]), block_len=4, scale=1.0)
    block_only = torch.softmax(Q[0] @ K[0, :4].T, -1)[0]
    assert block_only[1] > 0.5  # within the block alone key 1 looks dominant
    assert s[0, 1] < 0.01  # but the query hardly needs it


def test_queries_only_see_keys_at_or_before_their_position():
    K = _keys(6)
    Q = torch.zeros(1, 1, D)
    Q[0, 0, 4] = 20.0  # points at key 4, which it cannot see from position 3
    s = reconstruction_scores(Q, K, torch.tensor([3]), block_len=6, scale=1.0)
    assert s[0, 4] == 0 and s[0, 5] == 0
    assert torch.isclose(s[0, :4].sum(), torch.tensor(1.0))  # one query: its whole softmax is on keys 0..3


def test_compact_selects_by_given_key_scores_and_still_fits():
    g = torch.Generator().manual_seed(0)
    H, T, n = 2, 40, 64
    K, V, Q = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g), torch.randn(H, n, D, generator=g)
    scores = torch.zeros(H, T)
    scores[0, [7, 11, 23]] = 1.0
    scores[1, [5, 30, 31]] = 1.0
    r = compact(K, V, Q, 8, "highest_attention", key_scores=scores, recent=0.0, sinks=4, causal=False)
    assert {0, 1, 2, 3, 7, 11, 23} <= set(r.indices[0].tolist())
    assert {5, 30, 31} <= set(r.indices[1].tolist())
    plain = compact(K, V, Q, 8, "highest_attention", recent=0.0, sinks=4, causal=False)
    assert not torch.equal(plain.indices, r.indices)  # the scores, not the queries, chose
    assert torch.isfinite(r.beta).all() and torch.isfinite(r.values).all()


def test_the_score_from_each_querys_log_sum_exp_equals_the_full_softmax_score():
    """Queries after the block (a repetition): exp(max_q (q·k - lse_q)) is the largest softmax weight."""
    g = torch.Generator().manual_seed(1)
    H, T, extra, n = 2, 30, 20, 50
    K = torch.randn(H, T + extra, D, generator=g) * 2
    Q = torch.randn(H, n, D, generator=g) * 2
    pos = T + torch.randint(0, extra, (n,), generator=g)  # each query sees the block and part of the rest
    logits = (Q @ K.transpose(1, 2)).masked_fill(torch.arange(T + extra)[None, None] > pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(logits, -1)
    expected = reconstruction_scores(Q, K, pos, block_len=T, scale=1.0)
    got = reconstruction_scores_from_lse(Q, K[:, :T], lse, scale=1.0, chunk=16)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)
