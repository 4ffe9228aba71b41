"""key_scores Triton kernel vs its torch reference, under TRITON_INTERPRET=1 (set by conftest)."""

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.triton_interpreter

from vllm_attnmatch.kernels import key_scores_ref, key_scores_triton, score_keys  # noqa: E402

NEG_INF = float("-inf")


def assert_scores_close(got, want, tol):
    for name, g, w in zip(want._fields, got, want):
        assert g.dtype == torch.float32, name
        assert not torch.isnan(g).any(), name
        assert torch.equal(g.isneginf(), w.isneginf()), name
        torch.testing.assert_close(g.nan_to_num(neginf=0.0), w.nan_to_num(neginf=0.0), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_key_scores_match_reference_ragged_tiles(dtype, gen):
    # n and T not multiples of the tiles, d not a power of two: every edge is masked
    H, n, T, d = 2, 37, 70, 24
    q = torch.randn(H, n, d, generator=gen).to(dtype)
    k = torch.randn(H, T, d, generator=gen).to(dtype)
    got = key_scores_triton(q, k, d ** -0.5, block_n=16, block_t=32)
    # Products of 16-bit inputs are exact in fp32: the only difference to the reference is summation order.
    assert_scores_close(got, key_scores_ref(q, k, d ** -0.5), tol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_scores_with_bias_and_causal_positions(dtype, gen):
    H, n, T, d = 3, 21, 45, 16
    q = (2 * torch.randn(H, n, d, generator=gen)).to(dtype)
    k = torch.randn(H, T, d, generator=gen).to(dtype)
    bias = torch.randn(H, T, generator=gen)
    bias[:, ::7] = NEG_INF  # padding keys
    key_positions = torch.arange(T) + 10
    # unsorted query positions; the first query precedes every key (sees nothing: lse -inf, contributes 0)
    query_positions = torch.randint(10, T + 10, (n,), generator=gen)
    query_positions[0] = 3
    got = key_scores_triton(q, k, 0.25, bias, query_positions, key_positions, block_n=16, block_t=16)
    want = key_scores_ref(q, k, 0.25, bias, query_positions, key_positions)
    assert_scores_close(got, want, tol=2e-5)
    assert got.lse[:, 0].isneginf().all()
    assert got.max[:, ::7].eq(0).all()  # masked keys get no attention
    # keys after the last query position are seen by nobody
    unseen = key_positions > query_positions.max()
    assert got.rms[:, unseen].eq(0).all()


def test_key_scores_non_contiguous_inputs_and_dispatch(gen):
    # (n, H, d) storage viewed as (H, n, d): strided like per-token captured queries
    n, H, T, d = 19, 2, 33, 32
    q = torch.randn(n, H, d, generator=gen).transpose(0, 1)
    k = torch.randn(T, H, d, generator=gen).transpose(0, 1)
    want = key_scores_ref(q, k, 0.2)
    assert_scores_close(key_scores_triton(q, k, 0.2, block_n=16, block_t=16), want, tol=2e-5)
    assert_scores_close(score_keys(q, k, 0.2, use_triton=True), want, tol=2e-5)


def test_key_scores_input_checks(gen):
    q = torch.randn(2, 4, 8, generator=gen)
    with pytest.raises(ValueError):
        key_scores_triton(q, torch.randn(3, 5, 8), 1.0)
    with pytest.raises(TypeError):
        key_scores_triton(q, torch.randn(2, 5, 8).half(), 1.0)
    with pytest.raises(ValueError):
        key_scores_triton(q, torch.randn(2, 5, 8), 1.0, query_positions=torch.arange(4))
    with pytest.raises(ValueError):
        key_scores_triton(q, torch.randn(2, 5, 8), 1.0, block_t=24)


def test_kernels_run_in_the_interpreter_or_compiled_on_the_gpu(on_gpu):
    # conftest decorated the kernels under TRITON_INTERPRET=1; a compiled kernel could not run on CPU tensors.
    # On the GPU check (ATTNMATCH_KERNEL_TEST_DEVICE=cuda) they must be the compiled ones instead.
    from vllm_attnmatch.kernels import key_scores as ks
    from vllm_attnmatch.kernels._triton_common import interpreting

    assert interpreting(ks._query_lse_kernel) != on_gpu and interpreting(ks._key_stats_kernel) != on_gpu
