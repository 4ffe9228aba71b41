"""The torch view of vLLM's CPU paged KV layout, and attention with a per-slot β."""

import math

import pytest
import torch

from vllm_attnmatch.attention.cpu_paged import (
    BiasedRows,
    KVLayout,
    attend_biased_rows,
    attention_with_bias,
    gather_bias,
    gather_kv,
    probe_layout,
    vec_layout,
    write_bias,
)


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


# -- packings learned from the cache op -------------------------------------------------------------------


def _vllm_writer(isa):
    ops = pytest.importorskip("vllm._custom_ops")

    def write(keys, values, cache):
        num_blocks, heads, block_size, _ = cache.shape
        key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, torch.arange(keys.shape[0]), isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    return write


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probing_vllms_vec_op_finds_the_documented_vec_packing(dtype):
    for block_size, head_dim in ((128, 64), (32, 128)):
        probed = probe_layout(_vllm_writer("vec"), block_size, head_dim, dtype)
        expected = vec_layout(block_size, head_dim)
        assert torch.equal(probed.key_index, expected.key_index)
        assert torch.equal(probed.value_index, expected.value_index)


@pytest.mark.parametrize("isa, head_dim", [("vec", 64), ("vec16", 80), ("amx", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_through_a_probed_packing_reads_back_what_vllm_wrote(isa, head_dim, dtype):
    """``amx`` (bf16 on CPUs with AMX tiles) packs K differently from ``vec``; vLLM's writer for it runs on any
    x86 CPU, so its packing is checked here even though this machine's attention never picks it."""
    torch.manual_seed(3)
    heads, block_size, length = 3, 32, 75
    layout = probe_layout(_vllm_writer(isa), block_size, head_dim, dtype)
    kv_cache = torch.zeros(6, heads, block_size, 2 * head_dim, dtype=dtype)
    blocks = torch.tensor([4, 1, 5])
    keys, values = torch.randn(length, heads, head_dim).to(dtype), torch.randn(length, heads, head_dim).to(dtype)
    pos = torch.arange(length)
    slots = blocks[pos // block_size] * block_size + pos % block_size
    ops = pytest.importorskip("vllm._custom_ops")
    key_cache, value_cache = kv_cache.view(6, heads, 2 * block_size, -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa,
                                   k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    got_k, got_v = gather_kv(kv_cache, blocks, length, layout)
    assert torch.equal(got_k, keys.transpose(0, 1)) and torch.equal(got_v, values.transpose(0, 1))
    if isa == "amx" and dtype == torch.bfloat16:
        assert not torch.equal(layout.key_index, vec_layout(block_size, head_dim).key_index)


def test_probe_learns_any_one_to_one_packing_and_refuses_others():
    block_size, head_dim = 32, 16

    def transposed_values(keys, values, cache):  # K row-major, V transposed: the opposite of vec
        flat = cache.view(-1)
        n = keys.shape[0]
        flat[: n * head_dim] = keys[:, 0].reshape(-1)
        flat[block_size * head_dim :] = values[:, 0].T.reshape(-1)

    layout = probe_layout(transposed_values, block_size, head_dim, torch.bfloat16)
    t, j = 5, 7
    assert int(layout.key_index[t, j]) == t * head_dim + j
    assert int(layout.value_index[t, j]) == block_size * head_dim + j * block_size + t

    def keys_only(keys, values, cache):
        cache.view(-1)[: block_size * head_dim] = keys[:, 0].reshape(-1)

    with pytest.raises(ValueError, match="unwritten"):
        probe_layout(keys_only, block_size, head_dim, torch.float32)

    def first_token_everywhere(keys, values, cache):  # every slot holds token 0: not a placement
        cache.view(-1)[:] = keys[0, 0].repeat(2 * block_size)

    with pytest.raises(ValueError, match="one-to-one"):
        probe_layout(first_token_everywhere, block_size, head_dim, torch.float32)


def test_affine_packings_are_read_through_a_strided_view_and_others_element_by_element():
    """``vec`` (what this CPU's fp32 attention uses) is a strided placement: decode steps read it as a view;
    ``amx``'s interleaved pairs are not, and keep the element-wise gather (checked for exactness above)."""
    vec = vec_layout(128, 64)
    assert vec.key_strides == (0, 1, 128)  # K transposed: token stride 1, dim stride block_size
    assert vec.value_strides == (128 * 64, 64, 1)  # V row-major after the K half
    amx = probe_layout(_vllm_writer("amx"), 32, 64, torch.bfloat16)
    assert amx.key_strides is None
    # The strided read is the layout's map, slot for slot.
    torch.manual_seed(4)
    kv_cache = torch.randn(5, 3, 128, 128)
    flat = kv_cache.view(5, 3, -1)
    blocks = torch.tensor([3, 0, 4])
    keys, values = gather_kv(kv_cache, blocks, 300, vec)
    for p in (0, 1, 127, 128, 200, 299):
        block, t = int(blocks[p // 128]), p % 128
        assert torch.equal(keys[:, p], flat[block][:, vec.key_index[t]])
        assert torch.equal(values[:, p], flat[block][:, vec.value_index[t]])


def _shuffled_layout(block_size: int, head_dim: int) -> KVLayout:
    """A one-to-one packing that no strided view reads (like ``amx``): the element-wise gather path."""
    perm = torch.randperm(2 * block_size * head_dim, generator=torch.Generator().manual_seed(7))
    return KVLayout(key_index=perm[: block_size * head_dim].view(block_size, head_dim),
                    value_index=perm[block_size * head_dim:].view(block_size, head_dim))


def _mixed_step(layout: KVLayout, block_size=16, head_dim=8, kv_heads=2, q_heads=6):
    """A step of 5 requests in one paged cache: plain decode, compacted decode at two lengths, a compacted
    prefill chunk of 5 tokens, and a plain chunk; table entries past a request's blocks hold junk."""
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(12, kv_heads, block_size, 2 * head_dim, generator=g)
    bias = torch.randn(12, kv_heads, block_size, generator=g)
    q_lens, seq_lens = [1, 1, 1, 5, 3], [20, 37, 9, 30, 12]
    tables = torch.tensor([[0, 1, 0], [2, 7, 5], [9, -1, 11], [4, 10, -1], [3, 6, 8]])
    starts = torch.tensor([0, *q_lens]).cumsum(0)
    query = torch.randn(int(starts[-1]), q_heads, head_dim, generator=g)
    flat = cache.view(12, kv_heads, -1)

    def reference(row):  # dense attention over the request's slots, read through the layout's map
        n = seq_lens[row]
        pos = torch.arange(n)
        blocks, t = tables[row][pos // block_size], pos % block_size
        keys = torch.stack([flat[blocks[i], :, layout.key_index[t[i]]] for i in range(n)], dim=1)
        values = torch.stack([flat[blocks[i], :, layout.value_index[t[i]]] for i in range(n)], dim=1)
        beta = bias[blocks, :, t].T
        return _dense_attention(query[starts[row]:starts[row + 1]], keys, values, beta, 0.3)

    return cache, bias, query, tables, starts, torch.tensor(seq_lens), reference


@pytest.mark.parametrize("packing", ["vec", "non-affine"])
def test_compacted_rows_of_a_mixed_step_get_biased_attention_and_plain_rows_are_untouched(packing):
    """Decode rows of several compacted requests at different lengths run as one batch, a compacted
    prefill chunk runs causally on its own, and rows of plain requests keep the stock kernel's output."""
    layout = vec_layout(16, 8) if packing == "vec" else _shuffled_layout(16, 8)
    cache, bias, query, tables, starts, seq_lens, reference = _mixed_step(layout)
    compacted = [1, 2, 3]
    plan = BiasedRows.of(compacted, starts, seq_lens, tables, 16)
    assert plan.decode is not None and plan.decode.tokens.tolist() == [1, 2]
    assert [c[2] for c in plan.chunks] == [3]
    stock = torch.full((query.shape[0], 6 * 8), 123.0)  # what the stock kernel left: must stay for plain rows
    output = stock.clone()
    attend_biased_rows(plan, query, cache, bias, tables, 0.3, layout, output)
    for row in range(5):
        got = output[starts[row]:starts[row + 1]].view(-1, 6, 8)
        if row in compacted:
            torch.testing.assert_close(got, reference(row), atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(output[starts[row]:starts[row + 1]], stock[starts[row]:starts[row + 1]])


def test_batched_decode_rows_equal_one_request_at_a_time():
    """The batched decode path gives the per-request path's numbers, row for row (β and padding included)."""
    layout = vec_layout(16, 8)
    cache, bias, query, tables, starts, seq_lens, _ = _mixed_step(layout)
    rows = [0, 1, 2]  # three decode rows of lengths 20, 37 and 9: padded to 3 blocks
    batched = torch.zeros(query.shape[0], 6, 8)
    attend_biased_rows(BiasedRows.of(rows, starts, seq_lens, tables, 16), query, cache, bias, tables, 0.3, layout, batched)
    for row in rows:
        keys, values = gather_kv(cache, tables[row][: -(-int(seq_lens[row]) // 16)], int(seq_lens[row]), layout)
        beta = gather_bias(bias, tables[row][: -(-int(seq_lens[row]) // 16)], int(seq_lens[row]))
        one = attention_with_bias(query[starts[row]:starts[row] + 1], keys, values, beta, 0.3)
        torch.testing.assert_close(batched[starts[row]:starts[row] + 1], one, atol=1e-6, rtol=1e-6)
