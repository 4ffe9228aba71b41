"""Per-key attention statistics for key selection, without materialising the n×T score matrix.

Layout (one KV head per leading index; queries already grouped per KV head):
  queries          (H_kv, n, d)   fp32 / fp16 / bf16, any strides
  keys             (H_kv, T, d)   same dtype as queries, any strides
  bias             (H_kv, T)      optional, added to the scaled logits; -inf masks a key
  query_positions  (n,)           optional int, causal: query q sees key i iff key_positions[i] <= query_positions[q]
  key_positions    (T,)           optional int (given together with query_positions)
Outputs (:class:`KeyScores`, all fp32, contiguous):
  max, mean, rms   (H_kv, T)      over queries of p[q, i] = softmax_i(scale·q·k_i + bias_i); mean over all n queries
  lse              (H_kv, n)      per-query log-sum-exp of the logits (-inf when a query sees no key)

Two passes, both tiled: (1) per query block, an online max/sum over key tiles gives the log-sum-exp;
(2) per key block, a loop over query tiles recomputes the logits and accumulates max, Σp and Σp² of
p = exp(s - lse). Memory is O(H·(n + T)); work is 2·H·n·T·d multiply-adds. Accumulation is fp32; fp32
inputs use IEEE dot products by default (tf32 on request).

The torch reference is :func:`vllm_attnmatch.kernels.reference.key_scores_ref`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_common import dot, dot_config
from .reference import KeyScores, _check_causal

__all__ = ["key_scores_triton"]


@triton.jit
def _query_lse_kernel(
    q_ptr, k_ptr, bias_ptr, qpos_ptr, kpos_ptr, lse_ptr,
    n, T, D, scale,
    stride_qh, stride_qn, stride_qd,
    stride_kh, stride_kt, stride_kd,
    stride_bh, stride_bt,
    stride_lh, stride_ln,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    head = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_mask = offs_n < n
    d_mask = offs_d < D
    q_base = q_ptr + head.to(tl.int64) * stride_qh
    k_base = k_ptr + head.to(tl.int64) * stride_kh
    q = tl.load(
        q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=n_mask[:, None] & d_mask[None, :], other=0.0,
    )
    if CAUSAL:
        qpos = tl.load(qpos_ptr + offs_n, mask=n_mask, other=-1)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        k_t = tl.load(
            k_base + offs_t[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=t_mask[None, :] & d_mask[:, None], other=0.0,
        )
        s = dot(q, k_t, DOT_PRECISION, DOT_UPCAST) * scale
        valid = n_mask[:, None] & t_mask[None, :]
        if HAS_BIAS:
            b = tl.load(bias_ptr + head.to(tl.int64) * stride_bh + offs_t * stride_bt, mask=t_mask, other=0.0)
            s += b[None, :].to(tl.float32)
        if CAUSAL:
            kpos = tl.load(kpos_ptr + offs_t, mask=t_mask, other=0)
            valid &= kpos[None, :] <= qpos[:, None]
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no finite logit yet keeps m = -inf; subtract 0 instead to avoid inf - inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + head.to(tl.int64) * stride_lh + offs_n * stride_ln, lse, mask=n_mask)


@triton.jit
def _key_stats_kernel(
    q_ptr, k_ptr, bias_ptr, qpos_ptr, kpos_ptr, lse_ptr,
    max_ptr, mean_ptr, rms_ptr,
    n, T, D, scale, inv_n,
    stride_qh, stride_qn, stride_qd,
    stride_kh, stride_kt, stride_kd,
    stride_bh, stride_bt,
    stride_lh, stride_ln,
    stride_oh, stride_ot,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    head = tl.program_id(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < T
    d_mask = offs_d < D
    q_base = q_ptr + head.to(tl.int64) * stride_qh
    k_t = tl.load(
        k_ptr + head.to(tl.int64) * stride_kh + offs_t[None, :] * stride_kt + offs_d[:, None] * stride_kd,
        mask=t_mask[None, :] & d_mask[:, None], other=0.0,
    )
    if HAS_BIAS:
        b = tl.load(bias_ptr + head.to(tl.int64) * stride_bh + offs_t * stride_bt, mask=t_mask, other=0.0)
        b = b.to(tl.float32)
    if CAUSAL:
        kpos = tl.load(kpos_ptr + offs_t, mask=t_mask, other=0)
    acc_max = tl.zeros([BLOCK_T], tl.float32)
    acc_sum = tl.zeros([BLOCK_T], tl.float32)
    acc_sq = tl.zeros([BLOCK_T], tl.float32)
    for n0 in range(0, n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n
        q = tl.load(
            q_base + offs_n[:, None] * stride_qn + offs_d[None, :] * stride_qd,
            mask=n_mask[:, None] & d_mask[None, :], other=0.0,
        )
        lse = tl.load(lse_ptr + head.to(tl.int64) * stride_lh + offs_n * stride_ln, mask=n_mask, other=float("-inf"))
        s = dot(q, k_t, DOT_PRECISION, DOT_UPCAST) * scale
        if HAS_BIAS:
            s += b[None, :]
        valid = (n_mask & (lse > float("-inf")))[:, None] & t_mask[None, :]
        if CAUSAL:
            qpos = tl.load(qpos_ptr + offs_n, mask=n_mask, other=-1)
            valid &= kpos[None, :] <= qpos[:, None]
        lse_safe = tl.where(lse == float("-inf"), 0.0, lse)
        p = tl.where(valid, tl.exp(s - lse_safe[:, None]), 0.0)
        acc_max = tl.maximum(acc_max, tl.max(p, 0))
        acc_sum += tl.sum(p, 0)
        acc_sq += tl.sum(p * p, 0)
    out_off = head.to(tl.int64) * stride_oh + offs_t * stride_ot
    tl.store(max_ptr + out_off, acc_max, mask=t_mask)
    tl.store(mean_ptr + out_off, acc_sum * inv_n, mask=t_mask)
    tl.store(rms_ptr + out_off, tl.sqrt(acc_sq * inv_n), mask=t_mask)


def key_scores_triton(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    query_positions: Optional[torch.Tensor] = None,
    key_positions: Optional[torch.Tensor] = None,
    *,
    block_n: int = 64,
    block_t: int = 64,
    allow_tf32: bool = False,
) -> KeyScores:
    """Per-key max / mean / rms of the softmax attention, and per-query log-sum-exp (see module docstring).

    ``block_n`` / ``block_t``: query / key tile sizes (powers of two ≥ 16). ``allow_tf32``: use tf32 dot
    products for fp32 inputs (faster on GPU, ~1e-3 relative error in the logits).
    """
    if queries.dim() != 3 or keys.dim() != 3:
        raise ValueError(
            f"queries (H, n, d) and keys (H, T, d) expected, got {tuple(queries.shape)}, {tuple(keys.shape)}"
        )
    H, n, d = queries.shape
    if keys.shape[0] != H or keys.shape[2] != d:
        raise ValueError(f"keys must be ({H}, T, {d}), got {tuple(keys.shape)}")
    if queries.dtype != keys.dtype or queries.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"queries and keys must share a float dtype (fp32/fp16/bf16), got {queries.dtype}, {keys.dtype}"
        )
    if queries.device != keys.device:
        raise ValueError("queries and keys must be on the same device")
    T = keys.shape[1]
    causal = _check_causal(query_positions, key_positions, n, T)
    for name, blk in (("block_n", block_n), ("block_t", block_t)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    dev = queries.device
    if bias is not None:
        if bias.shape != (H, T):
            raise ValueError(f"bias must be ({H}, {T}), got {tuple(bias.shape)}")
        if bias.device != dev:
            raise ValueError("bias must be on the device of queries")
        bias_arg, sbh, sbt = bias, bias.stride(0), bias.stride(1)
    else:
        bias_arg, sbh, sbt = queries, 0, 0  # never read (HAS_BIAS=False)
    if causal:
        qpos = query_positions.to(device=dev, dtype=torch.int64).contiguous()
        kpos = key_positions.to(device=dev, dtype=torch.int64).contiguous()
    else:
        qpos = kpos = queries  # never read (CAUSAL=False)

    lse = torch.empty(H, n, dtype=torch.float32, device=dev)
    mx = torch.zeros(H, T, dtype=torch.float32, device=dev)
    mean = torch.zeros(H, T, dtype=torch.float32, device=dev)
    rms = torch.zeros(H, T, dtype=torch.float32, device=dev)
    if H == 0 or n == 0:
        return KeyScores(mx, mean, rms, lse)
    if T == 0:
        return KeyScores(mx, mean, rms, lse.fill_(float("-inf")))

    block_d = max(16, triton.next_power_of_2(d))
    common = dict(HAS_BIAS=bias is not None, CAUSAL=causal, BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_D=block_d,
                  **dot_config(queries.dtype, allow_tf32, _query_lse_kernel))
    _query_lse_kernel[(H, triton.cdiv(n, block_n))](
        queries, keys, bias_arg, qpos, kpos, lse,
        n, T, d, float(scale),
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        sbh, sbt,
        lse.stride(0), lse.stride(1),
        **common,
    )
    _key_stats_kernel[(H, triton.cdiv(T, block_t))](
        queries, keys, bias_arg, qpos, kpos, lse,
        mx, mean, rms,
        n, T, d, float(scale), 1.0 / n,
        queries.stride(0), queries.stride(1), queries.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        sbh, sbt,
        lse.stride(0), lse.stride(1),
        mx.stride(0), mx.stride(1),
        **common,
    )
    return KeyScores(mx, mean, rms, lse)
