"""The torch view of vLLM's CPU paged KV layout, and attention with a per-slot β."""

import math

import pytest
import torch

from vllm_attnmatch.attention.cpu_paged import attention_with_bias, gather_bias, gather_kv, write_bias


def _write_with_vllm_op(kv_cache, keys, values, slots):
    ops = pytest.importorskip("vllm._custom_ops")
    num_blocks, heads, block_size, _ = kv_cache.shape
    key_cache, value_cache = kv_cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, "vec",
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")


def test_gather_reads_back_what_vllms_cache_op_wrote():
    torch.manual_seed(0)
    heads, block_size, d, length = 3, 32, 64, 70
    kv_cache = torch.zeros(6, heads, block_size, 2 * d)
    blocks = torch.tensor([4, 1, 5])
    keys, values = torch.randn(length, heads, d), torch.randn(length, heads, d)
    pos = torch.arange(length)
    _write_with_vllm_op(kv_cache, keys, values, blocks[pos // block_size] * block_size + pos % block_size)
    got_k, got_v = gather_kv(kv_cache, blocks, length)
    torch.testing.assert_close(got_k, keys.transpose(0, 1))
    torch.testing.assert_close(got_v, values.transpose(0, 1))


def test_bias_round_trip_by_physical_slot():
    bias = torch.zeros(4, 3, 8)
    slots = torch.tensor([9, 10, 30])
    beta = torch.arange(9.0).view(3, 3)
    write_bias(bias, slots, beta)
    torch.testing.assert_close(gather_bias(bias, [1, 3], 16)[:, [1, 2]], beta[:, :2])
    assert float(bias.abs().sum()) == float(beta.abs().sum())


def _dense_attention(query, keys, values, bias, scale):
    q_len, hq, d = query.shape
    hk, L, _ = keys.shape
    g = hq // hk
    out = torch.empty(q_len, hq, d)
    for h in range(hq):
        kv = h // g
        for j in range(q_len):
            visible = L - q_len + j + 1
            s = keys[kv, :visible] @ query[j, h] * scale + bias[kv, :visible]
            out[j, h] = torch.softmax(s, 0) @ values[kv, :visible]
    return out


def test_attention_with_bias_matches_a_dense_loop_with_gqa_and_causality():
    torch.manual_seed(1)
    query, keys, values = torch.randn(5, 6, 16), torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    bias = torch.randn(2, 40)
    torch.testing.assert_close(attention_with_bias(query, keys, values, bias, 0.25),
                               _dense_attention(query, keys, values, bias, 0.25), atol=1e-5, rtol=1e-5)


def test_beta_log2_on_a_key_equals_duplicating_it():
    torch.manual_seed(2)
    query, keys, values = torch.randn(1, 3, 8), torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    bias = torch.zeros(3, 10)
    bias[:, 4] = math.log(2.0)
    dup_k = torch.cat([keys[:, :5], keys[:, 4:5], keys[:, 5:]], 1)
    dup_v = torch.cat([values[:, :5], values[:, 4:5], values[:, 5:]], 1)
    torch.testing.assert_close(attention_with_bias(query, keys, values, bias, 0.3),
                               attention_with_bias(query, dup_k, dup_v, torch.zeros(3, 11), 0.3))
