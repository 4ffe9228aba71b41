"""The CUDA glue's tensor plumbing (TRITON_ATTN layout, β side tensor, sub-batch of compacted rows),
run on CPU through the kernels' torch references and checked against the plain biased attention."""

import torch
from vllm_attnmatch.kernels import gather_paged_kv, scatter_paged_kv

from vllm_attnmatch.attention.cpu_paged import attention_with_bias
from vllm_attnmatch.attention.step_context import StepContext
from vllm_attnmatch.attention.triton_backend import biased_rows_attention


def test_biased_rows_attention_matches_per_request_reference():
    torch.manual_seed(0)
    blocks, heads, bs, d, group = 10, 2, 16, 8, 3
    kv_cache = torch.randn(blocks, heads, bs, 2 * d)  # the logical [blocks, H, bs, 2d] order vLLM hands in
    bias = torch.randn(blocks, heads, bs)
    block_table = torch.tensor([[3, 7, 0], [1, 2, 5], [9, 4, 6]], dtype=torch.int32)
    seq_lens = torch.tensor([20, 40, 33], dtype=torch.int32)
    query_starts = [0, 1, 6, 7]  # request 0: decode, 1: 5-token chunk, 2: decode
    query = torch.randn(7, heads * group, d)
    ctx = StepContext()
    ctx.begin_step({}, [1, 2], query_starts)
    tokens, out = biased_rows_attention(ctx, query, kv_cache, bias, block_table, seq_lens, d, 0.3)
    assert tokens.tolist() == [1, 2, 3, 4, 5, 6]
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    for row, (start, end) in ((1, (1, 6)), (2, (6, 7))):
        length = int(seq_lens[row])
        ids = block_table[row, : -(-length // bs)]
        kv = gather_paged_kv(key_cache, value_cache, ids, length, bias.transpose(1, 2))
        expected = attention_with_bias(query[start:end], kv.keys, kv.values, kv.bias, 0.3)
        got = out[[i for i, t in enumerate(tokens.tolist()) if start <= t < end]]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_scatter_then_gather_round_trips_through_the_side_tensor_view():
    torch.manual_seed(1)
    kv_cache = torch.zeros(6, 2, 16, 16)
    bias = torch.zeros(6, 2, 16)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(8, dim=-1)
    keys, values, beta = torch.randn(2, 20, 8), torch.randn(2, 20, 8), torch.randn(2, 20)
    ids = torch.tensor([4, 1], dtype=torch.int32)
    scatter_paged_kv(keys, values, beta, key_cache, value_cache, bias.transpose(1, 2), ids, 0, False)
    back = gather_paged_kv(key_cache, value_cache, ids, 20, bias.transpose(1, 2))
    torch.testing.assert_close(back.keys, keys)
    torch.testing.assert_close(back.values, values)
    torch.testing.assert_close(back.bias, beta)
    assert float(bias[4, :, :].abs().sum() + bias[1, :, :4].abs().sum()) == float(beta.abs().sum())
