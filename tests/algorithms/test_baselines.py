"""Each eviction baseline selects what its paper says, on hand-made attention patterns (issue 12.2).

The cases are built so the published rule and a plausible wrong one disagree: H2O counts a key that only
nearby queries attend (no query gap), SnapKV ranks by its last-32-query window and pools neighbours,
TOVA replays token-by-token eviction (checked against a direct set-based replay), StreamingLLM keeps
sinks + recent. Every baseline keeps the same attention sinks as AM and copies β / values.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_attnmatch.algorithms import BASELINES, compact, group_queries
from vllm_attnmatch.algorithms.snapkv import SnapKV, _per_head_groups

D = 8


def _one_hot(i: int, scale: float = 1.0) -> torch.Tensor:
    v = torch.zeros(D)
    v[i] = scale
    return v


def _case(T: int, hot_key: int, attending: range, strength: float = 12.0):
    """One KV head: every key is 0 except ``hot_key`` (direction 1); the queries at positions in
    ``attending`` point at it, the others are 0 (uniform causal attention)."""
    K = torch.zeros(1, T, D)
    K[0, hot_key] = _one_hot(1, strength)
    V = torch.randn(1, T, D, generator=torch.Generator().manual_seed(0))
    Q = torch.zeros(1, T, D)
    for p in attending:
        Q[0, p] = _one_hot(1, strength)
    pos = torch.arange(T)
    return K, V, Q, pos


def _run(method, K, V, Q, pos, t, **opts):
    return compact(K, V, Q, t, method, query_positions=pos, key_positions=pos, **opts)


def test_h2o_counts_attention_from_nearby_queries_no_query_gap():
    # key 40 is attended by the 8 queries right after it: 8 · ~1 of accumulated attention, more than any
    # uniformly attended key gets (key 4: Σ 1/(p+1) for p ≥ 4 ≈ 2.6). AM's 32-token gap would hide them.
    T = 64
    K, V, Q, pos = _case(T, 40, range(41, 49))
    r = _run("h2o", K, V, Q, pos, 5, recent_fraction=0.0)
    assert r.indices[0].tolist() == [0, 1, 2, 3, 40]  # 4 sinks + the heavy hitter
    gap = _run("h2o", K, V, Q, pos, 5, recent_fraction=0.0, query_gap=32)
    assert 40 not in gap.indices[0].tolist()  # with AM's gap imposed the heavy hitter is invisible


def test_h2o_splits_the_budget_between_heavy_hitters_and_recent_keys():
    T = 64
    K, V, Q, pos = _case(T, 20, range(21, 29))
    r = _run("h2o", K, V, Q, pos, 12)  # recent half: 6 keys, sinks 4, 2 heavy hitters
    kept = r.indices[0].tolist()
    assert kept[:4] == [0, 1, 2, 3] and kept[-6:] == list(range(58, 64)) and 20 in kept
    assert torch.equal(r.values, torch.gather(V, 1, r.indices.unsqueeze(-1).expand(1, 12, D)))
    assert torch.equal(r.beta, torch.zeros(1, 12))


def test_snapkv_scores_with_the_last_32_queries_pools_neighbours_and_keeps_the_window():
    T = 256
    # key 100 is what the observation window (positions 224..255) looks at; key 30 is attended by many
    # early queries only (H2O would rank it first).
    K, V, Q, pos = _case(T, 100, range(T - 32, T))
    K[0, 30] = _one_hot(2, 12.0)
    for p in range(31, 120):
        Q[0, p] = _one_hot(2, 12.0)
    r = _run("snapkv", K, V, Q, pos, 4 + 32 + 7)  # t // 2 = 21 recent (capped), 18 selected
    kept = r.indices[0].tolist()
    assert kept[:4] == [0, 1, 2, 3]
    assert set(range(97, 104)) <= set(kept)  # key 100 and its max-pool (kernel 7) neighbours
    assert set(range(T - 21, T)) <= set(kept)
    assert 30 in _run("h2o", K, V, Q, pos, 4 + 32 + 7).indices[0].tolist()
    scores = SnapKV().scores(_inputs(K, V, Q, pos))
    assert scores[0, 30] < 0.05 * scores[0, 100]  # the early heavy hitter is invisible to the window

    big = _run("snapkv", K, V, Q, pos, 4 + 64 + 7)  # budget ≥ 2 windows: the whole window is kept
    assert set(range(T - 32, T)) <= set(big.indices[0].tolist())


def _inputs(K, V, Q, pos):
    from vllm_attnmatch.algorithms.base import CompactionInputs

    return CompactionInputs(keys=K, values=V, queries=Q, target=10, scale=1 / math.sqrt(D), bias=None,
                            query_positions=pos, key_positions=pos, generator=torch.Generator(), gap=0)


def test_snapkv_pools_per_query_head_of_a_gqa_group():
    q = torch.randn(10, 6, D)  # 10 positions, 6 query heads over 2 KV heads
    _, positions = group_queries(q, 2, torch.arange(100, 110))
    assert _per_head_groups(positions, positions.numel()) == 3
    assert _per_head_groups(positions[:-1], positions.numel() - 1) == 1  # not whole copies: pooled mean


def _tova_reference(K, Q, t, sinks):
    """TOVA as the paper states it, one token at a time over an explicit set (slow, obvious)."""
    T = K.shape[1]
    cache: list[int] = []
    for p in range(T):
        cache.append(p)
        if len(cache) > t:
            keys = K[:, cache]
            probs = torch.softmax(torch.einsum("hnd,hmd->hnm", Q[:, p:p + 1], keys) / math.sqrt(D), -1)
            score = probs.mean((0, 1))
            for i, k in enumerate(cache):
                if k < sinks:
                    score[i] = float("inf")
            cache.pop(int(score.argmin()))
    return cache


def test_tova_replays_token_by_token_eviction_with_one_set_for_all_heads():
    g = torch.Generator().manual_seed(3)
    H, T, t = 2, 80, 12
    K = torch.randn(H, T, D, generator=g) * 2
    V = torch.randn(H, T, D, generator=g)
    Q = torch.randn(H, T, D, generator=g) * 2
    pos = torch.arange(T)
    r = _run("tova", K, V, Q, pos, t)
    assert torch.equal(r.indices[0], r.indices[1])  # layer-wise policy: heads share the kept set
    assert r.indices[0].tolist() == _tova_reference(K, Q, t, sinks=4)
    assert r.indices[0].tolist()[:4] == [0, 1, 2, 3]


def test_tova_keeps_a_key_every_later_query_attends():
    T = 40
    K, V, Q, pos = _case(T, 10, range(11, T))
    K[0, 11:] = torch.randn(T - 11, D, generator=torch.Generator().manual_seed(1)) * 0.1
    kept = _run("tova", K, V, Q, pos, 6).indices[0].tolist()
    assert 10 in kept and kept[:4] == [0, 1, 2, 3] and len(kept) == 6


def test_streaming_keeps_sinks_and_the_most_recent_keys():
    T = 50
    K, V, Q, pos = _case(T, 10, range(11, T))
    assert _run("streaming", K, V, Q, pos, 10).indices[0].tolist() == [0, 1, 2, 3] + list(range(44, 50))


@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_keeps_the_sinks_and_copies_plain_entries(method):
    g = torch.Generator().manual_seed(5)
    H, T, t = 3, 96, 20
    K, V = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    Q, pos = group_queries(torch.randn(T, 3 * H, D, generator=g), H, torch.arange(T))
    r = compact(K, V, Q, t, method, query_positions=pos, key_positions=torch.arange(T))
    assert r.indices.shape == (H, t)
    assert torch.equal(r.values, torch.gather(V, 1, r.indices.unsqueeze(-1).expand(H, t, D)))
    assert torch.equal(r.beta, torch.zeros(H, t))
    if method in ("h2o", "snapkv", "tova", "streaming"):
        assert (r.indices[:, :4] == torch.arange(4)).all()  # the same sinks as AM
