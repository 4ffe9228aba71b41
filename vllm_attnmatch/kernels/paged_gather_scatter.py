"""Move one request's KV between vLLM's paged layout and per-head tensors (compaction input and output).

Paged layout (vLLM TRITON_ATTN backend, any strides):
  key_cache, value_cache   [num_blocks, block_size, H_kv, d]
  bias_cache               [num_blocks, block_size, H_kv]   fp32 (0 normal, β compacted, -inf padding)
  block_ids                (num_req_blocks,) int32 / int64: the request's physical blocks in logical order
Per-head tensors:
  keys, values             (H_kv, T, d)
  bias / beta              (H_kv, T) fp32

gather: logical slots [0, T) → keys, values (cache dtype) and, if a bias cache is given, bias (fp32).
scatter: keys, values, beta (H_kv, t, ·) → logical slots [start_slot, start_slot + t); with ``pad_tail`` every
later slot of the given blocks becomes padding (key 0, value 0, bias -inf), so attention skips it. Values are
cast to the cache dtype on store.

Grid: (slot tiles of BLOCK_T, H_kv); each program moves a BLOCK_T × d tile of K and V and BLOCK_T bias entries.
The torch references are ``gather_paged_kv_ref`` / ``scatter_paged_kv_ref`` in
:mod:`vllm_attnmatch.kernels.reference`. The CPU_ATTN backend stores K transposed inside a block: this is
not its layout.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import GatheredKV

__all__ = ["gather_paged_kv_triton", "scatter_paged_kv_triton"]


@triton.jit
def _gather_kernel(
    k_cache_ptr, v_cache_ptr, bias_cache_ptr, block_ids_ptr, k_out_ptr, v_out_ptr, bias_out_ptr,
    T, D,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bb, stride_bs, stride_bh,
    stride_koh, stride_kot, stride_kod,
    stride_voh, stride_vot, stride_vod,
    stride_boh, stride_bot,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    t_mask = offs_t < T
    mask = t_mask[:, None] & (offs_d < D)[None, :]
    blk = tl.load(block_ids_ptr + offs_t // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
    slot = offs_t % BLOCK_SIZE
    k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_ks + head * stride_kh
                + offs_d[None, :] * stride_kd, mask=mask)
    tl.store(k_out_ptr + head * stride_koh + offs_t[:, None] * stride_kot + offs_d[None, :] * stride_kod, k, mask=mask)
    v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + head * stride_vh
                + offs_d[None, :] * stride_vd, mask=mask)
    tl.store(v_out_ptr + head * stride_voh + offs_t[:, None] * stride_vot + offs_d[None, :] * stride_vod, v, mask=mask)
    if HAS_BIAS:
        b = tl.load(bias_cache_ptr + blk * stride_bb + slot * stride_bs + head * stride_bh, mask=t_mask)
        tl.store(bias_out_ptr + head * stride_boh + offs_t * stride_bot, b, mask=t_mask)


@triton.jit
def _scatter_kernel(
    k_ptr, v_ptr, beta_ptr, k_cache_ptr, v_cache_ptr, bias_cache_ptr, block_ids_ptr,
    t, start_slot, end_slot, D,
    stride_kh, stride_kt, stride_kd,
    stride_vh, stride_vt, stride_vd,
    stride_beh, stride_bet,
    stride_kb, stride_ks, stride_kch, stride_kcd,
    stride_vb, stride_vs, stride_vch, stride_vcd,
    stride_bb, stride_bs, stride_bch,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_BETA: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # index among the slots to write
    head = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dst = start_slot + offs
    dst_mask = dst < end_slot
    src_mask = offs < t  # real entries; the rest of [start_slot, end_slot) is padding
    d_mask = (offs_d < D)[None, :]
    blk = tl.load(block_ids_ptr + dst // BLOCK_SIZE, mask=dst_mask, other=0).to(tl.int64)
    slot = dst % BLOCK_SIZE
    k = tl.load(k_ptr + head * stride_kh + offs[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=src_mask[:, None] & d_mask, other=0.0)
    tl.store(k_cache_ptr + blk[:, None] * stride_kb + slot[:, None] * stride_ks + head * stride_kch
             + offs_d[None, :] * stride_kcd, k, mask=dst_mask[:, None] & d_mask)
    v = tl.load(v_ptr + head * stride_vh + offs[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=src_mask[:, None] & d_mask, other=0.0)
    tl.store(v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + head * stride_vch
             + offs_d[None, :] * stride_vcd, v, mask=dst_mask[:, None] & d_mask)
    if HAS_BIAS:
        if HAS_BETA:
            b = tl.load(beta_ptr + head * stride_beh + offs * stride_bet, mask=src_mask, other=0.0).to(tl.float32)
        else:
            b = tl.zeros([BLOCK_T], tl.float32)
        b = tl.where(src_mask, b, float("-inf"))
        tl.store(bias_cache_ptr + blk * stride_bb + slot * stride_bs + head * stride_bch, b, mask=dst_mask)


def _check_caches(key_cache, value_cache, bias_cache, block_ids):
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(f"key/value caches must both be [num_blocks, block_size, H_kv, d], got "
                         f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    num_blocks, block_size, H_kv, _ = key_cache.shape
    if bias_cache is not None:
        if bias_cache.shape != (num_blocks, block_size, H_kv):
            raise ValueError(f"bias_cache must be [{num_blocks}, {block_size}, {H_kv}], got {tuple(bias_cache.shape)}")
        if bias_cache.device != key_cache.device:
            raise ValueError("bias_cache must be on the device of key_cache")
    if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_ids must be a 1-D int32/int64 tensor")
    if block_ids.device != key_cache.device or value_cache.device != key_cache.device:
        raise ValueError("caches and block_ids must be on one device")
    return block_size, H_kv


def gather_paged_kv_triton(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_tokens: int,
    bias_cache: Optional[torch.Tensor] = None,
    *,
    block_t: int = 64,
) -> GatheredKV:
    """Gather logical slots ``[0, num_tokens)`` of one request into contiguous ``(H_kv, T, d)`` keys/values
    (cache dtype) and, with ``bias_cache``, its ``(H_kv, T)`` fp32 bias."""
    block_size, H_kv = _check_caches(key_cache, value_cache, bias_cache, block_ids)
    d = key_cache.shape[3]
    T = int(num_tokens)
    if T < 0 or triton.cdiv(T, block_size) > block_ids.numel():
        raise ValueError(f"{T} tokens need {triton.cdiv(T, block_size)} blocks, got {block_ids.numel()}")
    dev = key_cache.device
    keys = torch.empty(H_kv, T, d, dtype=key_cache.dtype, device=dev)
    values = torch.empty(H_kv, T, d, dtype=value_cache.dtype, device=dev)
    bias = torch.empty(H_kv, T, dtype=torch.float32, device=dev) if bias_cache is not None else None
    if T == 0 or H_kv == 0:
        return GatheredKV(keys, values, bias)
    bc = bias_cache if bias_cache is not None else key_cache
    sb = bias_cache.stride() if bias_cache is not None else (0, 0, 0)
    bo = bias if bias is not None else keys
    sbo = bias.stride() if bias is not None else (0, 0)
    _gather_kernel[(triton.cdiv(T, block_t), H_kv)](
        key_cache, value_cache, bc, block_ids, keys, values, bo,
        T, d,
        *key_cache.stride(), *value_cache.stride(), *sb,
        *keys.stride(), *values.stride(), *sbo,
        BLOCK_SIZE=block_size, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d),
        HAS_BIAS=bias_cache is not None,
    )
    return GatheredKV(keys, values, bias)


def scatter_paged_kv_triton(
    keys: torch.Tensor,
    values: torch.Tensor,
    beta: Optional[torch.Tensor],
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    bias_cache: Optional[torch.Tensor],
    block_ids: torch.Tensor,
    start_slot: int = 0,
    pad_tail: bool = True,
    *,
    block_t: int = 64,
) -> None:
    """Write ``keys``/``values`` ``(H_kv, t, d)`` and ``beta`` ``(H_kv, t)`` into logical slots
    ``[start_slot, start_slot + t)`` of the blocks ``block_ids`` (in place). With ``pad_tail``, every later slot
    of those blocks gets key 0, value 0, bias -inf. ``beta=None`` writes bias 0; ``bias_cache=None`` writes no
    bias (then ``beta`` must be None)."""
    block_size, H_kv = _check_caches(key_cache, value_cache, bias_cache, block_ids)
    d = key_cache.shape[3]
    if keys.dim() != 3 or keys.shape[0] != H_kv or keys.shape[2] != d or values.shape != keys.shape:
        raise ValueError(f"keys/values must both be ({H_kv}, t, {d}), got {tuple(keys.shape)}, {tuple(values.shape)}")
    t = keys.shape[1]
    if beta is not None:
        if bias_cache is None:
            raise ValueError("beta given but no bias_cache to write it to")
        if beta.shape != (H_kv, t):
            raise ValueError(f"beta must be ({H_kv}, {t}), got {tuple(beta.shape)}")
    if any(x.device != key_cache.device for x in (keys, values) + ((beta,) if beta is not None else ())):
        raise ValueError("keys, values, beta must be on the device of the caches")
    capacity = block_ids.numel() * block_size
    if start_slot < 0 or start_slot + t > capacity:
        raise ValueError(
            f"slots [{start_slot}, {start_slot + t}) do not fit in {block_ids.numel()} blocks of {block_size}"
        )
    end_slot = capacity if pad_tail else start_slot + t
    n_slots = end_slot - start_slot
    if n_slots == 0 or H_kv == 0:
        return
    be = beta if beta is not None else keys
    sbe = beta.stride() if beta is not None else (0, 0)
    bc = bias_cache if bias_cache is not None else key_cache
    sb = bias_cache.stride() if bias_cache is not None else (0, 0, 0)
    _scatter_kernel[(triton.cdiv(n_slots, block_t), H_kv)](
        keys, values, be, key_cache, value_cache, bc, block_ids,
        t, start_slot, end_slot, d,
        *keys.stride(), *values.stride(), *sbe,
        *key_cache.stride(), *value_cache.stride(), *sb,
        BLOCK_SIZE=block_size, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(d),
        HAS_BIAS=bias_cache is not None, HAS_BETA=beta is not None,
    )
