"""The torch references are what the CPU path runs: check them against naive per-query / per-token loops.

No triton needed here.
"""

import math
import subprocess
import sys

import pytest
import torch
from vllm_attnmatch.kernels import (
    gather_paged_kv,
    gather_paged_kv_ref,
    key_scores_ref,
    paged_attention_bias_ref,
    paged_attention_with_bias,
    scatter_paged_kv,
    scatter_paged_kv_ref,
    score_keys,
    triton_available,
)

NEG_INF = float("-inf")


def naive_key_scores(q, k, scale, bias=None, qpos=None, kpos=None):
    H, n, _ = q.shape
    T = k.shape[1]
    mx = torch.zeros(H, T, dtype=torch.float64)
    sm = torch.zeros(H, T, dtype=torch.float64)
    sq = torch.zeros(H, T, dtype=torch.float64)
    lse = torch.full((H, n), NEG_INF, dtype=torch.float64)
    for h in range(H):
        for i in range(n):
            logits = []
            for j in range(T):
                if qpos is not None and int(kpos[j]) > int(qpos[i]):
                    logits.append(NEG_INF)
                    continue
                x = float(q[h, i].double() @ k[h, j].double()) * scale
                logits.append(x + (float(bias[h, j]) if bias is not None else 0.0))
            m = max(logits)
            if m == NEG_INF:
                continue
            z = sum(math.exp(x - m) for x in logits)
            lse[h, i] = m + math.log(z)
            for j, x in enumerate(logits):
                p = math.exp(x - m) / z
                mx[h, j] = max(mx[h, j], p)
                sm[h, j] += p
                sq[h, j] += p * p
    return mx, sm / n, (sq / n).sqrt(), lse


@pytest.mark.parametrize("variant", ["plain", "bias_causal"])
def test_key_scores_ref_matches_naive_loops(variant, gen):
    H, n, T, d = 2, 7, 11, 8
    q = torch.randn(H, n, d, generator=gen)
    k = torch.randn(H, T, d, generator=gen)
    kwargs = {}
    if variant == "bias_causal":
        bias = torch.randn(H, T, generator=gen)
        bias[0, 3] = NEG_INF
        # query 0 sits before every key: it sees nothing (lse -inf, contributes 0)
        kwargs = dict(bias=bias, query_positions=torch.tensor([-1, 0, 2, 4, 5, 9, 20]), key_positions=torch.arange(T))
    got = key_scores_ref(q, k, 0.35, **kwargs)
    want = naive_key_scores(q, k, 0.35, kwargs.get("bias"), kwargs.get("query_positions"), kwargs.get("key_positions"))
    for g, w in zip(got, want):
        assert not torch.isnan(g).any()
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)
    if variant == "bias_causal":
        assert got.lse[:, 0].eq(NEG_INF).all()


def naive_paged_attention(q_seqs, k_seqs, v_seqs, b_seqs, scale, group):
    """Dense per-sequence inputs; one (token, head) at a time."""
    outs = []
    for q, k, v, b in zip(q_seqs, k_seqs, v_seqs, b_seqs):
        q_len, H_q, d = q.shape
        L = k.shape[0]
        o = torch.zeros(q_len, H_q, d, dtype=torch.float64)
        for j in range(q_len):
            for h in range(H_q):
                kv_h = h // group
                logits = []
                for i in range(L - q_len + j + 1):
                    bb = float(b[i, kv_h]) if b is not None else 0.0
                    dot = float(q[j, h].double() @ k[i, kv_h].double())
                    logits.append(NEG_INF if bb == NEG_INF else dot * scale + bb)
                m = max(logits)
                if m == NEG_INF:
                    continue
                w = [math.exp(x - m) for x in logits]
                z = sum(w)
                for i, wi in enumerate(w):
                    if wi:
                        o[j, h] += wi / z * v[i, kv_h].double()
        outs.append(o)
    return torch.cat(outs)


@pytest.mark.parametrize("with_bias", [False, True])
def test_paged_attention_ref_matches_naive_dense(with_bias, gen, paged):
    H_kv, group, d, block_size = 2, 3, 8, 4
    seq_lens = [9, 1, 6, 5]
    q_lens = [3, 1, 1, 5]  # chunked prefill, a 1-token sequence, decode, full prefill
    k_seqs = [torch.randn(L, H_kv, d, generator=gen) for L in seq_lens]
    v_seqs = [torch.randn(L, H_kv, d, generator=gen) for L in seq_lens]
    b_seqs = [torch.randn(L, H_kv, generator=gen) for L in seq_lens] if with_bias else [None] * len(seq_lens)
    if with_bias:
        b_seqs[0][2, 0] = NEG_INF  # a padding slot inside the sequence
        b_seqs[2][:, 1] = NEG_INF  # KV head 1 of sequence 2 sees nothing: output 0, not NaN
    q_seqs = [torch.randn(ql, H_kv * group, d, generator=gen) for ql in q_lens]
    tensors = [(k, v, b) if with_bias else (k, v) for k, v, b in zip(k_seqs, v_seqs, b_seqs)]
    caches, table = paged(tensors, block_size, num_blocks=12, generator=gen,
                          fill=0.0 if not with_bias else float("nan"))
    if with_bias:
        # padding slots may hold garbage: poison the K/V behind every -inf bias
        for c in caches[:2]:
            c[caches[2].isneginf()] = float("nan")
    cu = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    got = paged_attention_bias_ref(torch.cat(q_seqs), caches[0], caches[1], caches[2] if with_bias else None,
                                   table, cu, torch.tensor(seq_lens, dtype=torch.int32), 0.4)
    want = naive_paged_attention(q_seqs, k_seqs, v_seqs, b_seqs, 0.4, group)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_gather_and_scatter_refs_match_naive_loops(gen):
    nb, bs, H, d = 6, 4, 2, 5
    kc, vc = torch.randn(nb, bs, H, d, generator=gen), torch.randn(nb, bs, H, d, generator=gen)
    bc = torch.randn(nb, bs, H, generator=gen)
    ids = torch.tensor([4, 0, 3], dtype=torch.int32)
    T = 10
    g = gather_paged_kv_ref(kc, vc, ids, T, bc)
    for pos in range(T):
        blk, off = int(ids[pos // bs]), pos % bs
        assert torch.equal(g.keys[:, pos], kc[blk, off])
        assert torch.equal(g.values[:, pos], vc[blk, off])
        assert torch.equal(g.bias[:, pos], bc[blk, off])

    t, start = 5, 2
    keys, values = torch.randn(H, t, d, generator=gen), torch.randn(H, t, d, generator=gen)
    beta = torch.randn(H, t, generator=gen)
    kc2, vc2, bc2 = kc.clone(), vc.clone(), bc.clone()
    scatter_paged_kv_ref(keys, values, beta, kc2, vc2, bc2, ids, start_slot=start)
    for pos in range(ids.numel() * bs):
        blk, off = int(ids[pos // bs]), pos % bs
        if pos < start:  # untouched
            assert torch.equal(kc2[blk, off], kc[blk, off]) and torch.equal(bc2[blk, off], bc[blk, off])
        elif pos < start + t:
            assert torch.equal(kc2[blk, off], keys[:, pos - start])
            assert torch.equal(vc2[blk, off], values[:, pos - start])
            assert torch.equal(bc2[blk, off], beta[:, pos - start])
        else:  # padding
            assert kc2[blk, off].eq(0).all() and vc2[blk, off].eq(0).all() and bc2[blk, off].isneginf().all()
    untouched = [b for b in range(nb) if b not in ids.tolist()]
    assert torch.equal(kc2[untouched], kc[untouched]) and torch.equal(bc2[untouched], bc[untouched])


def test_dispatchers_use_torch_on_cpu(gen):
    assert not triton_available("cpu")
    q, k = torch.randn(1, 3, 4, generator=gen), torch.randn(1, 5, 4, generator=gen)
    for g, w in zip(score_keys(q, k, 0.5), key_scores_ref(q, k, 0.5)):
        assert torch.equal(g, w)
    kc, vc = torch.randn(2, 4, 1, 4, generator=gen), torch.randn(2, 4, 1, 4, generator=gen)
    ids = torch.tensor([1, 0], dtype=torch.int32)
    got = gather_paged_kv(kc, vc, ids, 6)
    assert torch.equal(got.keys, gather_paged_kv_ref(kc, vc, ids, 6).keys)
    out = paged_attention_with_bias(torch.randn(1, 1, 4, generator=gen), kc, vc, None, ids[None], torch.tensor([0, 1]),
                               torch.tensor([6]), 0.5)
    assert out.shape == (1, 1, 4)
    scatter_paged_kv(got.keys[:, :3], got.values[:, :3], None, kc, vc, None, ids[:1])
    assert kc[1, 3].eq(0).all()


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_needs_neither_triton_nor_vllm():
    r = _run_python(
        "import sys\n"
        "import vllm_attnmatch.kernels as k\n"
        "assert 'vllm' not in sys.modules, 'imported vllm'\n"
        "assert 'triton' not in sys.modules, 'imported triton eagerly'\n"
    )
    assert r.returncode == 0, r.stderr


def test_import_without_triton_falls_back_to_torch():
    r = _run_python(
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` fail and find_spec return None\n"
        "import torch\n"
        "import vllm_attnmatch.kernels as k\n"
        "assert not k.HAS_TRITON and not k.triton_available('cuda')\n"
        "q = torch.randn(1, 2, 4); s = k.score_keys(q, torch.randn(1, 3, 4), 0.5)\n"
        "assert s.rms.shape == (1, 3)\n"
    )
    assert r.returncode == 0, r.stderr
