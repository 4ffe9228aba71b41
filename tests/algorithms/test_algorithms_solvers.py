"""The maths of the fit on synthetic data: NNLS, ridge values, causal targets, the streamed (query-tiled)
targets, budgets. Device-dependent tests run on the CPU and on CUDA when present (``device`` fixture)."""

import itertools
import math

import pytest
import torch

from vllm_attnmatch.algorithms import budget, global_head_budgets, head_budgets, load_head_shares, save_head_shares
from vllm_attnmatch.algorithms.nnls import nnls
from vllm_attnmatch.algorithms import compact
from vllm_attnmatch.algorithms.scoring import reduce_scores
from vllm_attnmatch.algorithms.targets import compute_targets, stream_targets, visibility
from vllm_attnmatch.algorithms.values import ridge_path


def _brute_force_box_ls(A, y, lo, hi):
    """Exact box-constrained LS by enumerating which variables sit at a bound (3^t cases)."""
    t = A.shape[1]
    best, best_w = math.inf, None
    for pattern in itertools.product((0, 1, 2), repeat=t):  # 0 = lo, 1 = free, 2 = hi
        w = torch.zeros(t, dtype=torch.float64)
        free = [i for i, p in enumerate(pattern) if p == 1]
        for i, p in enumerate(pattern):
            if p != 1:
                w[i] = lo if p == 0 else hi
        if free:
            fixed_part = A @ w
            sol = torch.linalg.lstsq(A[:, free], (y - fixed_part).unsqueeze(-1)).solution.squeeze(-1)
            if (sol < lo - 1e-12).any() or (sol > hi + 1e-12).any():
                continue
            w[free] = sol
        obj = float((A @ w - y).pow(2).sum())
        if obj < best:
            best, best_w = obj, w
    return best_w, best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nnls_matches_brute_force_box_least_squares(seed, device):
    g = torch.Generator().manual_seed(seed)
    A = torch.rand(3, 12, 4, generator=g, dtype=torch.float64)
    y = torch.rand(3, 12, generator=g, dtype=torch.float64) * 2
    lo, hi = 0.05, 1.5
    w = nnls(A.float().to(device), y.float().to(device), lo, hi, iters=3000).cpu()
    for h in range(3):
        ref_w, ref_obj = _brute_force_box_ls(A[h], y[h], lo, hi)
        obj = float((A[h] @ w[h].double() - y[h]).pow(2).sum())
        assert obj <= ref_obj * (1 + 1e-4) + 1e-7
        assert torch.allclose(w[h].double(), ref_w, atol=2e-3)
    assert (w >= lo).all() and (w <= hi).all()


def test_nnls_ridge_pulls_towards_prior():
    g = torch.Generator().manual_seed(3)
    A = torch.rand(2, 30, 5, generator=g)
    y = torch.rand(2, 30, generator=g) * 3
    free = nnls(A, y, 0.0, 100.0, iters=2000)
    strong = nnls(A, y, 0.0, 100.0, ridge=1e6, prior=torch.ones(2, 5), iters=2000)
    assert torch.allclose(strong, torch.ones(2, 5), atol=1e-3)
    assert not torch.allclose(free, torch.ones(2, 5), atol=1e-2)


def test_ridge_path_matches_closed_form_and_limits(device):
    g = torch.Generator().manual_seed(4)
    X = torch.softmax(torch.randn(2, 50, 6, generator=g) * 2, -1)
    Y = torch.randn(2, 50, 8, generator=g)
    prior = torch.randn(2, 6, 8, generator=g)
    alphas = (1e-6, 0.1, float("inf"))
    sols = [s.cpu() for s in ridge_path(X.to(device), Y.to(device), prior.to(device), alphas)]
    G = X.transpose(1, 2) @ X
    for h in range(2):
        lam = 0.1 * torch.trace(G[h]) / 6
        ref = torch.linalg.solve(G[h] + lam * torch.eye(6), X[h].T @ Y[h] + lam * prior[h])
        assert torch.allclose(sols[1][h], ref, atol=1e-4)
        lstsq = torch.linalg.lstsq(X[h].double(), Y[h].double()).solution.float()
        assert torch.allclose(sols[0][h], lstsq, atol=1e-2)
    assert torch.equal(sols[2], prior)


@pytest.mark.parametrize("factorisation", ["cholesky", "eigen fallback"])
def test_ridge_path_with_fewer_rows_than_keys_solves_the_same_primal_problem(factorisation, monkeypatch):
    """n < t takes the rows' n×n system; its solutions are the primal ridge solutions, checked against
    a direct float64 solve of ``(XᵀX + λI) C = XᵀY + λ·prior`` (masked zero rows included)."""
    g = torch.Generator().manual_seed(6)
    H, n, t, d = 2, 7, 20, 3
    X = torch.softmax(torch.randn(H, n, t, generator=g) * 2, -1)
    X[:, -2:] = 0.0  # rows the fit masks out
    Y, prior = torch.randn(H, n, d, generator=g), torch.randn(H, t, d, generator=g)
    Y[:, -2:] = 0.0
    alphas = (1e-4, 1e-2, 1.0, float("inf"))
    if factorisation == "eigen fallback":
        real = torch.linalg.cholesky_ex
        monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: (real(A)[0], torch.ones_like(real(A)[1])))
    sols = ridge_path(X, Y, prior, alphas)
    Xd, Yd, Pd = X.double(), Y.double(), prior.double()
    for alpha, sol in zip(alphas[:-1], sols):
        for h in range(H):
            G = Xd[h].T @ Xd[h]
            lam = alpha * torch.trace(G) / t
            ref = torch.linalg.solve(G + lam * torch.eye(t, dtype=G.dtype), Xd[h].T @ Yd[h] + lam * Pd[h])
            assert torch.allclose(sol[h].double(), ref, atol=1e-4, rtol=1e-4), (alpha, h)
    assert torch.equal(sols[-1], prior)


def test_ridge_path_falls_back_to_the_eigendecomposition_when_a_factorisation_fails(monkeypatch):
    """The Cholesky path and its eigen fallback give the same solutions; a failed factorisation (forced
    here) takes the fallback instead of returning garbage."""
    g = torch.Generator().manual_seed(5)
    X = torch.softmax(torch.randn(3, 80, 12, generator=g) * 2, -1)
    Y, prior = torch.randn(3, 80, 4, generator=g), torch.randn(3, 12, 4, generator=g)
    alphas = (1e-4, 1e-2, 1.0, float("inf"))
    fast = ridge_path(X, Y, prior, alphas)

    real = torch.linalg.cholesky_ex

    def failing(A):
        L, info = real(A)
        return L, torch.ones_like(info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing)
    robust = ridge_path(X, Y, prior, alphas)
    for a, b in zip(fast, robust):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_causal_targets_ignore_future_keys(device):
    g = torch.Generator().manual_seed(5)
    K, V, Q = (torch.randn(1, 10, 4, generator=g).to(device) for _ in range(3))
    pos = torch.arange(10, device=device)
    vis = visibility(pos, pos)
    a = compute_targets(K, V, Q, 0.5, visible=vis)
    K2, V2 = K.clone(), V.clone()
    K2[:, 6:] += 3.0
    V2[:, 6:] -= 5.0
    b = compute_targets(K2, V2, Q, 0.5, visible=vis)
    assert torch.allclose(a.output[:, :6], b.output[:, :6]) and torch.allclose(a.log_mass[:, :6], b.log_mass[:, :6])
    assert not torch.allclose(a.output[:, 6:], b.output[:, 6:])
    # query 0 sees only key 0: its output is exactly v_0
    assert torch.allclose(a.output[0, 0], V[0, 0], atol=1e-6)
    full = compute_targets(K, V, Q, 0.5)
    assert not torch.allclose(full.output[:, :6], a.output[:, :6])


def test_budget():
    assert budget(1000, ratio=0.1) == 100
    assert budget(10, ratio=0.01) == 1
    assert budget(100, target_tokens=500) == 100
    assert budget(100, target_tokens=7) == 7
    with pytest.raises(ValueError):
        budget(100)
    with pytest.raises(ValueError):
        budget(100, ratio=1.5)


def test_head_budgets_follow_shares_cap_and_keep_total(tmp_path):
    shares = {(0, 0): 0.5, (0, 1): 0.1, (1, 0): 0.3, (1, 1): 0.1}
    path = tmp_path / "b.json"
    save_head_shares(shares, path)
    assert '"L0H0"' in path.read_text()
    loaded = load_head_shares(path)
    assert loaded == shares
    b = head_budgets(loaded, 2, 2, T=100, t=40, max_ratio=0.75)
    assert int(b.max()) <= 75 and b[0, 0] == 75
    assert abs(int(b.sum()) - 160) <= 3  # total kept, up to flooring
    assert b[1, 0] > b[0, 1]
    scores = torch.rand(2, 2, 100)
    scores[1, 1] *= 10
    gb = global_head_budgets(scores, t=10)
    assert gb[1, 1] == gb.max() and 38 <= int(gb.sum()) <= 44  # every head keeps ≥ 1


def test_query_gap_hides_the_nearest_keys():
    pos = torch.arange(8)
    vis = visibility(pos, pos, gap=3)
    assert vis[5].tolist() == [True, True, True, False, False, False, False, False]
    assert not vis[:3].any()  # the first queries see nothing and drop out of the fit
    g = torch.Generator().manual_seed(11)
    K, V, Q = (torch.randn(1, 8, 4, generator=g) for _ in range(3))
    tg = compute_targets(K, V, Q, 0.5, visible=vis)
    assert tg.valid[0].tolist() == [False] * 3 + [True] * 5
    assert torch.allclose(tg.output[0, 3], V[0, 0], atol=1e-6)  # query 3 only sees key 0


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tile", [1, 7, 64, 10_000])
@pytest.mark.parametrize("query_order", ["shuffled", "by position"])
def test_streamed_targets_match_the_full_block_softmax(device, causal, tile, query_order):
    # The query-tiled pass (issue 13.4) must give the same rowmax, log-mass, outputs, key scores and
    # (kept for OMP) block softmax as the (H, n, T) targets it replaces, whatever the tile, the query
    # order and the bias. Queries in position order (as subsampled) write the softmax through views.
    g = torch.Generator().manual_seed(12)
    H, T, n, d = 2, 50, 90, 8
    K, V, Q = (torch.randn(H, m, d, generator=g).to(device) for m in (T, T, n))
    bias = torch.randn(H, T, generator=g).to(device)
    qpos = torch.randperm(n, generator=g) % T  # unsorted, repeated, CPU (as the engine passes them)
    if query_order == "by position":
        qpos = qpos.sort().values
    kpos = torch.arange(T)
    gap = 3
    vis = visibility(qpos.to(device), kpos.to(device), gap) if causal else None
    full = compute_targets(K, V, Q, 0.3, bias, vis)
    weights = (torch.rand(n, generator=g) > 0.3).float().to(device)
    rows = torch.tensor([0, 5, 17, 40, 89])
    st = stream_targets(K, V, Q, 0.3, bias, qpos if causal else None, kpos if causal else None, gap,
                        ("sum", "mean", "rms", "max"), weights, rows, tile, keep_probs=True)
    assert torch.equal(st.valid, full.valid)
    torch.testing.assert_close(st.probs, full.probs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(st.rowmax, full.rowmax)
    torch.testing.assert_close(st.log_mass, full.log_mass)
    torch.testing.assert_close(st.output, full.output[:, rows.to(device)], atol=1e-5, rtol=1e-5)
    for r in ("sum", "mean", "rms", "max"):
        ref = reduce_scores(full.probs, r, weights.expand(H, n))
        torch.testing.assert_close(st.scores[r], ref, atol=1e-6, rtol=1e-5)
    assert st.peak_work_bytes <= 2 * H * min(tile, n) * T * 4


def test_the_fit_gives_the_same_compaction_whatever_the_query_tile(device):
    g = torch.Generator().manual_seed(13)
    K, V, Q = (torch.randn(3, m, 16, generator=g).to(device) for m in (200, 200, 600))
    kw = dict(query_positions=torch.arange(200).repeat(3), key_positions=torch.arange(200), seed=3)
    whole = compact(K, V, Q, 20, query_tile=10**6, **kw)
    for tile in (1, 33, 128):
        tiled = compact(K, V, Q, 20, query_tile=tile, **kw)
        assert torch.equal(tiled.indices, whole.indices) and torch.equal(tiled.gate, whole.gate)
        torch.testing.assert_close(tiled.beta, whole.beta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tiled.values, whole.values, atol=1e-5, rtol=1e-5)
    # Work memory is bounded by the tile, not by the number of queries.
    assert compact(K, V, Q, 20, query_tile=33, **kw).info["peak_work_bytes"] <= 2 * 3 * 33 * 200 * 4
    assert whole.info["peak_work_bytes"] > 10 * compact(K, V, Q, 20, query_tile=33, **kw).info["peak_work_bytes"]


def test_compact_reports_time_per_component():
    g = torch.Generator().manual_seed(14)
    K, V, Q = (torch.randn(2, m, 8, generator=g) for m in (64, 64, 128))
    r = compact(K, V, Q, 8, query_positions=torch.arange(64).repeat(2), key_positions=torch.arange(64))
    assert set(r.timings) == {"queries", "scoring", "beta", "values", "gate"}
    assert all(v > 0 for v in r.timings.values()) and sum(r.timings.values()) <= r.seconds + 1e-3  # each really timed
    baseline = compact(K, V, Q, 8, "h2o")
    assert set(baseline.timings) == {"queries", "scoring", "gate"}


def test_streamed_and_dense_targets_give_the_same_compaction(device, monkeypatch):
    # The default path streams query tiles; building the full (H, n, T) targets first (as OMP does) must
    # not change the compaction beyond float rounding.
    from vllm_attnmatch.algorithms.highest_attention import HighestAttention

    g = torch.Generator().manual_seed(15)
    K, V, Q = (torch.randn(3, m, 16, generator=g).to(device) * 1.5 for m in (300, 300, 900))
    kw = dict(query_positions=torch.arange(300).repeat(3), key_positions=torch.arange(300), query_tile=64)
    streamed = compact(K, V, Q, 30, **kw)
    select = HighestAttention.select

    def dense_select(self, inp):
        assert inp.targets.probs.shape == (3, 900, 300)  # built in full, then scores and fit stats come from it
        return select(self, inp)

    monkeypatch.setattr(HighestAttention, "select", dense_select)
    dense = compact(K, V, Q, 30, **kw)
    assert torch.equal(dense.indices, streamed.indices) and torch.equal(dense.gate, streamed.gate)
    torch.testing.assert_close(dense.beta, streamed.beta, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dense.values, streamed.values, atol=1e-4, rtol=1e-4)


def test_an_unknown_score_reduction_is_refused_by_name():
    g = torch.Generator().manual_seed(16)
    K, V, Q = (torch.randn(2, m, 8, generator=g) for m in (32, 32, 40))
    with pytest.raises(ValueError, match="bogus"):
        compact(K, V, Q, 8, reduction="bogus")
    with pytest.raises(ValueError, match="bogus"):
        stream_targets(K, V, Q, 0.3, reductions=("sum", "bogus"))


@pytest.mark.parametrize("method", ["omp", "highest_attention"])
def test_the_order_of_the_reference_queries_changes_nothing(method):
    # compact() visits queries in position order (GQA pooling hands them over head after head); the
    # same queries in another order must give the same compaction up to rounding.
    g = torch.Generator().manual_seed(16)
    K, V, Q = (torch.randn(3, m, 16, generator=g) * 1.5 for m in (300, 300, 900))
    qpos = torch.arange(300).repeat(3)
    kw = dict(key_positions=torch.arange(300), query_tile=64, max_queries=None)
    ref = compact(K, V, Q, 30, method, query_positions=qpos, **kw)
    perm = torch.randperm(900, generator=g)
    shuffled = compact(K, V, Q[:, perm], 30, method, query_positions=qpos[perm], **kw)
    assert torch.equal(shuffled.indices, ref.indices) and torch.equal(shuffled.gate, ref.gate)
    torch.testing.assert_close(shuffled.beta, ref.beta, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(shuffled.values, ref.values, atol=1e-3, rtol=1e-3)


def test_omp_grown_gram_solves_the_same_nnls_as_the_selected_columns_alone():
    # OMP grows its selection's Gram matrix column by column, with dead slots for dropped or untaken
    # columns (a dropped column may come back). The solve must equal NNLS on the live columns alone.
    from vllm_attnmatch.algorithms.omp import _SelectedColumns

    g = torch.Generator().manual_seed(17)
    H, n, T = 2, 40, 30
    A = torch.rand(H, n, T, generator=g)
    y = torch.ones(H, n)
    design = _SelectedColumns(A, y, torch.tensor([0, 1]).expand(H, -1), room=3)  # room grows
    design.add(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.tensor([[True, True, True], [True, True, False]]))
    low = torch.zeros(H, T, dtype=torch.bool)
    low[0, 6] = low[1, 9] = True
    design.drop(low)
    design.add(torch.tensor([[6, 12], [9, 13]]), torch.ones(H, 2, dtype=torch.bool))  # 6 and 9 come back
    live = [[0, 1, 5, 7, 6, 12], [0, 1, 8, 9, 13]]  # head 1 never took 10
    w = design.solve(torch.ones(H, T), 0.01, 10.0, iters=3000)
    for h in range(H):
        ref = nnls(A[h:h + 1, :, live[h]], y[h:h + 1], 0.01, 10.0, iters=3000)[0]
        torch.testing.assert_close(w[h, live[h]], ref, atol=1e-4, rtol=1e-4)
        others = torch.ones(T, dtype=torch.bool)
        others[live[h]] = False
        assert (w[h, others] == 0).all()
    torch.testing.assert_close(design.times(w), torch.einsum("hnt,ht->hn", A, w), atol=1e-4, rtol=1e-4)
