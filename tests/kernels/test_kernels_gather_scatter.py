"""Paged gather/scatter Triton kernels vs their torch references, under TRITON_INTERPRET=1 (set by conftest)."""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton_interpreter

from vllm_attnmatch.kernels import (  # noqa: E402
    gather_paged_kv,
    gather_paged_kv_ref,
    gather_paged_kv_triton,
    scatter_paged_kv,
    scatter_paged_kv_ref,
    scatter_paged_kv_triton,
)

NEG_INF = float("-inf")


def make_caches(gen, num_blocks=9, block_size=16, H_kv=2, d=24, dtype=torch.float32, vllm_strides=False):
    if vllm_strides:
        kv = torch.randn(num_blocks, H_kv, block_size, 2 * d, generator=gen).to(dtype)
        key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)
        bias_cache = torch.randn(num_blocks, H_kv, block_size, generator=gen).transpose(1, 2)
    else:
        key_cache = torch.randn(num_blocks, block_size, H_kv, d, generator=gen).to(dtype)
        value_cache = torch.randn(num_blocks, block_size, H_kv, d, generator=gen).to(dtype)
        bias_cache = torch.randn(num_blocks, block_size, H_kv, generator=gen)
    return key_cache, value_cache, bias_cache


@pytest.mark.parametrize("dtype,vllm_strides", [(torch.float32, True), (torch.bfloat16, False)])
def test_gather_matches_reference(dtype, vllm_strides, gen):
    caches = make_caches(gen, dtype=dtype, vllm_strides=vllm_strides)
    block_ids = torch.tensor([7, 2, 5, 0], dtype=torch.int32)
    for T in (1, 16, 53):  # one token, exactly one block, ragged last block
        got = gather_paged_kv_triton(caches[0], caches[1], block_ids, T, caches[2], block_t=32)
        want = gather_paged_kv_ref(caches[0], caches[1], block_ids, T, caches[2])
        assert got.keys.shape == (2, T, 24) and got.keys.dtype == dtype and got.bias.dtype == torch.float32
        for g, w in zip(got, want):
            assert torch.equal(g, w)
    got = gather_paged_kv_triton(caches[0], caches[1], block_ids.long(), 20)
    assert got.bias is None and torch.equal(got.values, gather_paged_kv_ref(caches[0], caches[1], block_ids, 20).values)


@pytest.mark.parametrize("start_slot,pad_tail", [(0, True), (5, True), (3, False)])
def test_scatter_matches_reference(start_slot, pad_tail, gen):
    t = 37
    keys, values = torch.randn(2, t, 24, generator=gen), torch.randn(2, t, 24, generator=gen)
    beta = torch.randn(2, t, generator=gen)
    beta[1, -3:] = NEG_INF  # a head padded to the layer's max length by the caller
    block_ids = torch.tensor([4, 8, 1], dtype=torch.int32)
    a = make_caches(gen, vllm_strides=True)
    b = tuple(c.clone() for c in a)
    scatter_paged_kv_triton(keys, values, beta, *a, block_ids, start_slot, pad_tail, block_t=16)
    scatter_paged_kv_ref(keys, values, beta, *b, block_ids, start_slot, pad_tail)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if pad_tail:
        end = start_slot + t - 32  # first padding slot inside the last block (physical block 1)
        assert a[2][1, end:].isneginf().all() and a[2][1, end - 1, 0].isfinite()
        assert a[1][1, -1].eq(0).all() and a[0][1, -1].eq(0).all()


def test_scatter_casts_to_cache_dtype_and_defaults_beta_to_zero(gen):
    t = 10
    keys, values = torch.randn(2, t, 24, generator=gen), torch.randn(2, t, 24, generator=gen)
    a = make_caches(gen, dtype=torch.bfloat16)
    b = tuple(c.clone() for c in a)
    block_ids = torch.tensor([3], dtype=torch.int64)
    scatter_paged_kv_triton(keys, values, None, *a, block_ids)
    scatter_paged_kv_ref(keys, values, None, *b, block_ids)
    # Triton 3.9's interpreter truncates fp32 -> bf16 on store (the GPU rounds to nearest even, like torch):
    # allow one bf16 ulp on the cast K/V; the fp32 bias must match exactly.
    for x, y in zip(a[:2], b[:2]):
        torch.testing.assert_close(x.float(), y.float(), rtol=2 ** -7, atol=0)
    assert torch.equal(a[2], b[2])
    assert a[2][3, :t].eq(0).all() and a[2][3, t:].isneginf().all()
    # without a bias cache only K/V are written
    k_before = a[0].clone()
    scatter_paged_kv_triton(keys, values, None, a[0], a[1], None, torch.tensor([6]), pad_tail=False)
    torch.testing.assert_close(a[0][6, :t].float(), keys.transpose(0, 1), rtol=2 ** -7, atol=0)
    assert torch.equal(a[0][6, t:], k_before[6, t:])


def test_scatter_then_gather_round_trip_and_dispatch(gen):
    t = 29
    keys, values = torch.randn(2, t, 24, generator=gen), torch.randn(2, t, 24, generator=gen)
    beta = torch.randn(2, t, generator=gen)
    caches = make_caches(gen)
    block_ids = torch.tensor([6, 3], dtype=torch.int32)
    scatter_paged_kv(keys, values, beta, *caches, block_ids, use_triton=True)
    got = gather_paged_kv(caches[0], caches[1], block_ids, 32, caches[2], use_triton=True)
    assert torch.equal(got.keys[:, :t], keys) and torch.equal(got.values[:, :t], values)
    assert torch.equal(got.bias[:, :t], beta) and got.bias[:, t:].isneginf().all()
    assert got.keys[:, t:].eq(0).all() and got.values[:, t:].eq(0).all()


def test_input_checks(gen):
    k, v, b = make_caches(gen)
    ids = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(ValueError):
        gather_paged_kv_triton(k, v, ids, 33)  # needs 3 blocks
    with pytest.raises(ValueError):
        scatter_paged_kv_triton(torch.zeros(2, 30, 24), torch.zeros(2, 30, 24), None, k, v, b, ids, start_slot=5)
    with pytest.raises(ValueError):
        scatter_paged_kv_triton(torch.zeros(2, 3, 24), torch.zeros(2, 3, 24), torch.zeros(2, 3), k, v, None, ids)
    with pytest.raises(ValueError):
        gather_paged_kv_triton(k, v, ids.float(), 3)
