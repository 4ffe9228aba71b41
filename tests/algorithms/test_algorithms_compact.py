"""The compact() contract on synthetic data: shapes, bounds, exactness, determinism, β-aware re-compaction.

Every test runs on the CPU and, when one is present, on CUDA (the ``device`` fixture), with positions
built on the CPU as the engine builds them."""

import math

import pytest
import torch

from vllm_attnmatch.algorithms import BASELINES, METHODS, compact, compact_chunked, group_queries
from vllm_attnmatch.algorithms.targets import block_attention, compute_targets, visibility


def _data(seed=0, H=3, T=96, n=160, d=16, spread=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(H, T, d, generator=g) * spread
    V = torch.randn(H, T, d, generator=g)
    Q = torch.randn(H, n, d, generator=g) * spread
    return K.to(device), V.to(device), Q.to(device)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_valid_finite_entries(method, device):
    K, V, Q = _data(device=device)
    qpos = torch.arange(160) % 96  # CPU positions next to device tensors, as the engine passes them
    r = compact(K, V, Q, 12, method, query_positions=qpos, key_positions=torch.arange(96))
    assert r.keys.shape == (3, 12, 16) and r.values.shape == (3, 12, 16)
    assert r.beta.shape == (3, 12) and r.beta.dtype == torch.float32
    assert r.indices.shape == (3, 12) and r.indices.dtype == torch.long
    for x in (r.keys, r.values, r.beta, r.indices):
        assert x.device.type == device.type
    for h in range(3):
        idx = r.indices[h]
        assert idx.unique().numel() == 12 and (idx.diff() > 0).all() and 0 <= idx.min() and idx.max() < 96
        assert torch.equal(r.keys[h], K[h, idx])  # keys are a subset, RoPE untouched
    assert torch.isfinite(r.beta).all() and torch.isfinite(r.values).all()
    if method in BASELINES:
        assert torch.equal(r.beta, torch.zeros(3, 12, device=device))
        assert torch.equal(r.values, torch.gather(V, 1, r.indices[..., None].expand(3, 12, 16)))
    if method in BASELINES:
        assert math.isnan(r.fit_error)  # eviction fits nothing: not evaluated
    else:  # the mean held-out relative output error, as documented
        assert math.isfinite(r.fit_error) and r.fit_error >= 0
        assert abs(r.fit_error - float(r.heldout_output_error.mean())) < 1e-6


@pytest.mark.parametrize("method", METHODS)
def test_model_dtype_inputs_with_cpu_positions_and_more_queries_than_the_cap(method, device, model_dtype):
    # The engine's inputs: K/V in the model dtype on the device, reference queries on the device, positions
    # on the CPU (torch.arange), and more query rows than max_queries, so the rows are subsampled (issue
    # 13.1: this indexed CPU positions with a device index and every real GPU compaction failed).
    K, V, Q = _data(13, T=128, n=600, device=device)
    K, V = K.to(model_dtype), V.to(model_dtype)
    qpos = torch.arange(200).repeat(3)  # three query heads per KV head, pooled
    r = compact(K, V, Q, 16, method, query_positions=qpos, key_positions=torch.arange(128), max_queries=256,
                query_tile=64)
    assert r.keys.dtype == model_dtype and r.values.dtype == model_dtype and r.beta.dtype == torch.float32
    assert r.keys.device.type == device.type and r.indices.device.type == device.type
    assert torch.isfinite(r.beta).all() and torch.isfinite(r.values.float()).all()
    assert torch.equal(r.keys, torch.gather(K, 1, r.indices[..., None].expand(3, 16, 16)))
    # The same positions as int32 on the device, or as a list, give the same compaction.
    for other in (qpos.int().to(device), qpos.tolist()):
        r2 = compact(K, V, Q, 16, method, query_positions=other, key_positions=torch.arange(128), max_queries=256,
                     query_tile=64)
        assert torch.equal(r2.indices, r.indices) and torch.equal(r2.beta, r.beta)


def _unambiguous_block(seed=14, H=3, T=128, n=600, d=16, t=16):
    """A block whose best keys win by a clear margin: ``t`` loud keys per head among quiet ones. On random
    keys the ``t``-th and ``t+1``-th scores can differ by less than the rounding of another device, and a
    comparison of two devices' selections is then a coin toss; here it is not (checked on the CPU below)."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(H, T, d, generator=g) * 0.3
    V = torch.randn(H, T, d, generator=g)
    Q = torch.randn(H, n, d, generator=g)
    for h in range(H):
        loud = torch.randperm(88, generator=g)[:t] + 4  # visible to most causal queries (gap 32)
        K[h, loud] = torch.nn.functional.normalize(torch.randn(t, d, generator=g), dim=-1) * 1.5 * d**0.5
    return K, V, Q


# Every key chosen by score or greedy step (no forced sinks or recent window), engine-shaped positions.
_SELECT_ALL = dict(query_positions=torch.arange(200).repeat(3), key_positions=torch.arange(128), max_queries=256,
                   sinks=0, recent=0.0)


def _assert_same_compaction(other, ref):
    """The same keys, and β, values and fit error equal up to float rounding."""
    assert torch.equal(other.indices.cpu(), ref.indices)
    torch.testing.assert_close(other.keys.cpu(), ref.keys, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(other.beta.cpu(), ref.beta, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(other.values.cpu(), ref.values, atol=2e-3, rtol=1e-2)
    assert abs(other.fit_error - ref.fit_error) <= 1e-3 + 1e-2 * ref.fit_error


@pytest.mark.parametrize("method", ("highest_attention", "omp"))
def test_the_device_comparison_block_has_no_near_ties(method):
    """Inputs perturbed by 1e-4 (relative; far more than fp32 rounding differs between devices) give the
    same compaction: the CUDA comparison below can demand equal indices without depending on luck."""
    K, V, Q = _unambiguous_block()
    ref = compact(K, V, Q, 16, method, **_SELECT_ALL)
    g = torch.Generator().manual_seed(1)
    K2, V2, Q2 = (x * (1 + 1e-4 * torch.randn(x.shape, generator=g)) for x in (K, V, Q))
    _assert_same_compaction(compact(K2, V2, Q2, 16, method, **_SELECT_ALL), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ("highest_attention", "omp"))
def test_cuda_and_cpu_compute_the_same_compaction(method):
    K, V, Q = _unambiguous_block()
    cpu = compact(K, V, Q, 16, method, **_SELECT_ALL)
    gpu = compact(K.cuda(), V.cuda(), Q.cuda(), 16, method, **_SELECT_ALL)
    _assert_same_compaction(gpu, cpu)


def test_full_budget_reproduces_the_block_exactly(device):
    K, V, Q = _data(1, device=device)
    bias = torch.randn(3, 96, device=device)
    for b in (None, bias):
        r = compact(K, V, Q, 96, bias=b)
        assert torch.equal(r.keys, K) and torch.equal(r.values, V)
        assert torch.equal(r.beta, torch.zeros(3, 96, device=device) if b is None else b)
        assert torch.equal(r.indices[0].cpu(), torch.arange(96))


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_given_seed(method, device):
    K, V, Q = _data(2, device=device)
    a = compact(K, V, Q, 10, method, seed=7, max_queries=100)
    b = compact(K, V, Q, 10, method, seed=7, max_queries=100)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.beta, b.beta) and torch.equal(a.values, b.values)


def test_random_depends_on_seed():
    K, V, Q = _data(2)
    assert not torch.equal(compact(K, V, Q, 10, "random", seed=1).indices, compact(K, V, Q, 10, "random", seed=2).indices)


def test_outputs_stay_bounded_and_bf16_storable_on_hostile_data(device):
    # Near-duplicate keys and huge logits: plain least squares blows up here (κ ≈ ∞).
    g = torch.Generator().manual_seed(3)
    base = torch.randn(3, 8, 16, generator=g) * 6
    K = (base.repeat_interleave(12, dim=1) + 1e-4 * torch.randn(3, 96, 16, generator=g)).to(device)
    V = torch.randn(3, 96, 16, generator=g).to(device)
    Q = (torch.randn(3, 200, 16, generator=g) * 6).to(device)
    for method in ("highest_attention", "omp"):
        r = compact(K, V, Q, 20, method, value_clip=4.0)
        assert (r.beta.abs() <= 3.0 + 1e-5).all()
        assert float(r.values.abs().max()) <= 4.0 * float(V.abs().max()) + 1e-4
        for x in (r.keys, r.values, r.beta):
            assert torch.isfinite(x.to(torch.bfloat16)).all()


def test_beta_recovers_duplicated_mass_exactly(device):
    # 8 distinct keys each present 12 times: keeping one copy each with β = log 12 is an exact compaction.
    g = torch.Generator().manual_seed(4)
    base_k = torch.randn(2, 8, 16, generator=g)
    base_v = torch.randn(2, 8, 16, generator=g)
    K, V = base_k.repeat_interleave(12, 1).to(device), base_v.repeat_interleave(12, 1).to(device)
    Q = torch.randn(2, 300, 16, generator=g).to(device)
    r = compact(K, V, Q, 8, "omp", beta_bounds=(-3.0, 3.0), sinks=0, recent=0.0, keys_per_step=1, nnls_every=1,
                progressive=False)
    kept_keys = {tuple(k.tolist()) for k in r.keys[0]}
    assert len(kept_keys) == 8  # one copy of each distinct key
    assert torch.allclose(r.beta, torch.full_like(r.beta, math.log(12)), atol=1e-2)
    lm, out = block_attention(Q, r.keys, r.values, r.beta, 0.25)
    tg = compute_targets(K, V, Q, 0.25)
    assert torch.allclose(lm, tg.log_mass, atol=1e-2) and torch.allclose(out, tg.output, atol=1e-3)
    # Eviction at the same indices misses the mass by log 12.
    lm0, _ = block_attention(Q, r.keys, r.values, torch.zeros_like(r.beta), 0.25)
    assert (tg.log_mass - lm0).mean() > 2.0


def test_gate_never_accepts_a_fit_that_is_worse_on_heldout_queries(device):
    K, V, Q = _data(5, n=400, device=device)
    for t in (5, 20, 60):
        r = compact(K, V, Q, t)
        fitted = r.heldout_output_error + r.heldout_mass_error
        plain = r.plain_output_error + r.plain_mass_error
        assert (fitted <= plain + 1e-5).all()
        assert math.isfinite(r.fit_error) and abs(r.fit_error - float(r.heldout_output_error.mean())) < 1e-6


def test_recompaction_keeps_and_uses_the_old_bias(device):
    K, V, Q = _data(6, n=300, device=device)
    g = torch.Generator().manual_seed(9)
    bias = (torch.randn(3, 96, generator=g) * 1.5).to(device)
    # Plain kept entries carry their old β: attention over them equals biased attention over K[idx].
    r = compact(K, V, Q, 30, "h2o", bias=bias)
    assert torch.equal(r.beta, torch.gather(bias, 1, r.indices))
    r = compact(K, V, Q, 30, bias=bias, fit_values=False, gate=False)
    kept_bias = torch.gather(bias, 1, r.indices)
    # stored β = fitted log-weight + old bias, and the log-weight is within the fit's bounds
    assert ((r.beta - kept_bias).abs() <= 3.0 + 1e-5).all()
    with_bias = compute_targets(K, V, Q, 0.25, bias=bias)
    without = compute_targets(K, V, Q, 0.25)
    lm, _ = block_attention(Q, r.keys, r.values, r.beta, 0.25)
    err_with = (lm - with_bias.log_mass).pow(2).mean()
    err_without = (lm - without.log_mass).pow(2).mean()
    assert err_with < 0.25 * err_without  # the fit reproduces the biased targets, not the unbiased ones
    # and a second compaction of the compacted cache is consistent with its β
    r2 = compact(r.keys, r.values, Q, 30, bias=r.beta)
    assert torch.equal(r2.beta, r.beta) and torch.equal(r2.values, r.values)


def test_with_positions_the_fit_matches_causal_attention_and_without_them_full_attention(device):
    """Positions make the targets distant-causal (a query sees keys at least ``query_gap`` = 32 before it):
    the compaction fitted with them reproduces that attention better than the one fitted without, and
    the one fitted without reproduces full attention better. Each is judged on the queries' own view of
    the kept keys (their positions are their indices here)."""
    K, V, Q = _data(7, n=96, device=device)
    pos = torch.arange(96)
    causal = compact(K, V, Q, 12, query_positions=pos, key_positions=pos)
    full = compact(K, V, Q, 12)
    assert torch.isfinite(causal.values).all() and torch.isfinite(causal.beta).all()
    scale = 16**-0.5
    vis = visibility(pos, pos, gap=32).to(device)

    def output_error(r, causal_view: bool) -> float:
        target = compute_targets(K, V, Q, scale, visible=vis if causal_view else None)
        kept = (r.indices.cpu()[:, None, :] <= pos[None, :, None] - 32).to(device) if causal_view else None
        _, out = block_attention(Q, r.keys, r.values, r.beta, scale, visible=kept)
        rel = (out - target.output).norm(dim=-1) / target.output.norm(dim=-1).clamp_min(1e-6)
        return float(rel[target.valid].mean())

    assert output_error(causal, True) < 0.85 * output_error(full, True)  # measured 0.73 vs 0.98
    assert output_error(full, False) < 0.6 * output_error(causal, False)  # measured 0.54 vs 1.16


def test_query_cap_subsamples(device):
    K, V, Q = _data(8, n=500, device=device)
    r = compact(K, V, Q, 10, max_queries=50, seed=1)
    r2 = compact(K, V, Q[:, :50], 10, seed=1)
    assert r.indices.shape == r2.indices.shape and math.isfinite(r.fit_error)


def test_chunked_compaction_covers_all_chunks(device):
    K, V, Q = _data(9, T=100, device=device)
    r = compact_chunked(K, V, Q, 20, chunk_tokens=30, key_positions=torch.arange(100))
    assert r.keys.shape == (3, 20, 16)
    assert r.indices.shape == (3, 20)
    for start, end in ((0, 30), (30, 60), (60, 90), (90, 100)):
        inside = ((r.indices[0] >= start) & (r.indices[0] < end)).sum()
        assert inside >= 1
    assert torch.equal(r.keys[0], K[0, r.indices[0]])


def test_group_queries_layout_matches_gqa_convention():
    q = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)  # n=2 tokens, 6 query heads
    grouped, pos = group_queries(q, num_kv_heads=2)
    assert grouped.shape == (2, 6, 1)
    # KV head 1 serves query heads 3,4,5
    assert grouped[1, :, 0].tolist() == [3.0, 9.0, 4.0, 10.0, 5.0, 11.0]
    assert pos.tolist() == [0, 1, 0, 1, 0, 1]


def test_rejects_unknown_method_and_option():
    K, V, Q = _data()
    with pytest.raises(ValueError):
        compact(K, V, Q, 10, "nope")
    with pytest.raises(TypeError):
        compact(K, V, Q, 10, bogus=1)


def test_per_head_budgets_pad_shorter_heads_with_no_attention(device):
    from vllm_attnmatch.algorithms import PAD_BETA, compact_per_head, global_head_budgets, head_scores

    K, V, Q = _data(10, device=device)
    causal = head_scores(K, Q, torch.arange(160) * 96 // 160, torch.arange(96))  # CPU positions
    assert causal.shape == (3, 96) and torch.isfinite(causal).all()
    scores = head_scores(K, Q).unsqueeze(0)  # (L=1, H, T)
    budgets = global_head_budgets(scores, t=12)[0].tolist()
    r = compact_per_head(K, V, Q, [5, 12, 20])
    assert r.keys.shape == (3, 20, 16) and (r.indices >= 0).sum(dim=1).tolist() == [5, 12, 20]
    assert (r.beta[0, 5:] == PAD_BETA).all() and (r.indices[0, 5:] == -1).all()
    assert torch.isfinite(r.beta).all() and torch.isfinite(r.values[:, :5]).all()
    alone = compact(K[1:2], V[1:2], Q[1:2], 12)
    assert torch.equal(alone.indices[0], r.indices[1, :12])
    assert sum(budgets) >= 30
