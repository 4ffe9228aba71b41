"""paged_attention_bias Triton kernel vs its torch reference, under TRITON_INTERPRET=1 (set by conftest)."""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton_interpreter

from vllm_attnmatch.kernels import (  # noqa: E402
    paged_attention_bias_ref,
    paged_attention_bias_triton,
    paged_attention_with_bias,
)

NEG_INF = float("-inf")
# fp32 output; for 16-bit inputs the kernel rounds p to the value dtype before P·V (as flash attention does)
# and stores a 16-bit output, while the reference works in fp32: allow a few output ulps.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_batch(gen, seq_lens, q_lens, H_kv=2, group=3, d=24, block_size=16, num_blocks=None,
               with_bias=True, dtype=torch.float32, vllm_strides=False):
    """Random batch in vLLM's TRITON_ATTN layout with shuffled blocks; unused slots and -inf slots hold NaN."""
    max_blocks = max(-(-L // block_size) for L in seq_lens)
    num_blocks = num_blocks or sum(-(-L // block_size) for L in seq_lens) + 3
    if vllm_strides:
        # vLLM allocates (num_blocks, H_kv, block_size, 2*d) and views key/value as transpose(1,2).split(d, -1)
        kv = torch.randn(num_blocks, H_kv, block_size, 2 * d, generator=gen).to(dtype)
        key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)
        bias_cache = torch.randn(num_blocks, H_kv, block_size, generator=gen).transpose(1, 2)  # strided too
    else:
        key_cache = torch.randn(num_blocks, block_size, H_kv, d, generator=gen).to(dtype)
        value_cache = torch.randn(num_blocks, block_size, H_kv, d, generator=gen).to(dtype)
        bias_cache = torch.randn(num_blocks, block_size, H_kv, generator=gen)
    bias_cache.masked_fill_(torch.rand(bias_cache.shape, generator=gen) < 0.15, NEG_INF)
    key_cache.masked_fill_(bias_cache.isneginf()[..., None], float("nan"))  # padding slots hold garbage
    value_cache.masked_fill_(bias_cache.isneginf()[..., None], float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).int()
    table = torch.full((len(seq_lens), max_blocks + 1), 0, dtype=torch.int32)
    used = 0
    for s, L in enumerate(seq_lens):
        nblk = -(-L // block_size)
        table[s, :nblk] = perm[used: used + nblk]
        used += nblk
        # the newest token's own slot always has bias 0 in practice (a fresh, uncompacted entry)
        if q_lens[s]:
            last = L - 1
            blk, off = int(table[s, last // block_size]), last % block_size
            bias_cache[blk, off] = 0.0
            key_cache[blk, off] = torch.randn(H_kv, d, generator=gen).to(dtype)
            value_cache[blk, off] = torch.randn(H_kv, d, generator=gen).to(dtype)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    query = torch.randn(int(cu[-1]), H_kv * group, d, generator=gen).to(dtype)
    if not with_bias:
        bias_cache = None
        key_cache.nan_to_num_(0.0)
        value_cache.nan_to_num_(0.0)
    return query, key_cache, value_cache, bias_cache, table, cu, torch.tensor(seq_lens, dtype=torch.int32)


def run_both(batch, scale=0.2, **kw):
    got = paged_attention_bias_triton(*batch, scale, **kw)
    want = paged_attention_bias_ref(*batch, scale)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mixed_batch_chunked_prefill_decode_gqa(dtype, gen):
    # chunked prefill with context, decode, a full prefill, a sequence with no new tokens, decode at a
    # block boundary; GQA with H_q = 3·H_kv
    seq_lens = [40, 7, 33, 5, 17]
    q_lens = [21, 1, 1, 0, 17]
    batch = make_batch(gen, seq_lens, q_lens, dtype=dtype)
    got, want = run_both(batch, tile=16)
    assert got.dtype == dtype
    assert not torch.isnan(got[: int(batch[5][-1])]).any()
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])


def test_decode_only_batch_vllm_cache_strides(gen):
    seq_lens = [1, 16, 17, 50]
    batch = make_batch(gen, seq_lens, [1] * 4, H_kv=2, group=4, d=32, block_size=16, vllm_strides=True)
    assert not batch[1].is_contiguous() and not batch[3].is_contiguous()
    got, want = run_both(batch, scale=32 ** -0.5, max_seqlen_q=1)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("group", [1, 3])
def test_prefill_without_bias_matches_plain_causal_attention(group, gen):
    seq_lens, q_lens = [23, 9], [23, 4]
    batch = make_batch(gen, seq_lens, q_lens, H_kv=1, group=group, d=16, block_size=8, with_bias=False)
    got, want = run_both(batch, tile=16, block_m=16)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # first sequence is a plain causal prefill: compare with SDPA on the gathered dense tensors
    query, key_cache, value_cache, _, table, _, _ = batch
    k = key_cache[table[0, :3].long()].reshape(-1, 1, 16)[:23]
    v = value_cache[table[0, :3].long()].reshape(-1, 1, 16)[:23]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        query[:23].transpose(0, 1), k.transpose(0, 1).expand(group, -1, -1), v.transpose(0, 1).expand(group, -1, -1),
        is_causal=True, scale=0.2,
    ).transpose(0, 1)
    torch.testing.assert_close(got[:23], sdpa, rtol=2e-5, atol=2e-5)


def test_rows_with_no_finite_logit_give_zero_not_nan(gen):
    seq_lens, q_lens = [10, 6], [2, 1]
    batch = list(make_batch(gen, seq_lens, q_lens, H_kv=2, group=2, d=16, block_size=4))
    bias_cache, table = batch[3], batch[4]
    for b in table[0, :3].tolist():  # every slot of sequence 0, KV head 1 masked, own key included
        bias_cache[b, :, 1] = NEG_INF
    got, want = run_both(batch, tile=16)
    assert not torch.isnan(got).any()
    assert got[:2, 2:].eq(0).all()  # query heads 2, 3 read KV head 1
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_zero_bias_equals_no_bias_and_dispatch(gen):
    batch = list(make_batch(gen, [12, 30], [3, 1], H_kv=2, group=2, d=16, block_size=8, with_bias=False))
    no_bias = paged_attention_bias_triton(*batch, 0.3)
    batch[3] = torch.zeros(batch[1].shape[:3])
    torch.testing.assert_close(paged_attention_bias_triton(*batch, 0.3), no_bias, rtol=1e-6, atol=1e-6)
    out = torch.empty_like(batch[0])
    batch[4:7] = [x.long() for x in batch[4:7]]  # int64 block table / cu_seqlens_q / seq_lens work too
    res = paged_attention_with_bias(*batch, 0.3, out, use_triton=True, max_seqlen_q=3, num_splits=2)
    assert res is out
    torch.testing.assert_close(out, no_bias, rtol=1e-6, atol=1e-6)


def test_input_checks(gen):
    batch = list(make_batch(gen, [8], [1], H_kv=2, group=2, d=16, block_size=4))
    with pytest.raises(TypeError):
        paged_attention_bias_triton(batch[0].half(), *batch[1:], 0.1)
    with pytest.raises(ValueError):
        paged_attention_bias_triton(batch[0][:, :3], *batch[1:], 0.1)  # H_q not a multiple of H_kv
    with pytest.raises(ValueError):
        paged_attention_bias_triton(*batch[:3], batch[3][..., :1], *batch[4:], 0.1)


@pytest.mark.parametrize("num_splits", [2, 5])
def test_split_kv_matches_reference(num_splits, gen):
    # decode batch with long and very short sequences (some splits get no tile at all), plus a prefill chunk
    seq_lens = [70, 1, 3, 45]
    q_lens = [1, 1, 1, 6]
    batch = make_batch(gen, seq_lens, q_lens, H_kv=2, group=3, d=16, block_size=8)
    got, want = run_both(batch, tile=16, num_splits=num_splits)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_split_kv_rows_without_finite_logit_and_bf16(gen):
    batch = list(make_batch(gen, [40, 9], [1, 1], H_kv=2, group=2, d=16, block_size=8, dtype=torch.bfloat16))
    bias_cache, table = batch[3], batch[4]
    for b in table[1, :2].tolist():  # sequence 1, KV head 0: nothing visible
        bias_cache[b, :, 0] = NEG_INF
    got, want = run_both(batch, tile=16, num_splits=3)
    assert not torch.isnan(got).any() and got[1, :2].eq(0).all()
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
