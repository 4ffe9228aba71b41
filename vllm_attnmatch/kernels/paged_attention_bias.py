"""Attention over vLLM's paged KV layout with a per-slot additive bias β (prefill chunks and decode, GQA).

Layout (vLLM TRITON_ATTN backend, any strides):
  query         [num_tokens, H_q, d]                 fp32 / fp16 / bf16; the new tokens of all sequences, packed
  key_cache     [num_blocks, block_size, H_kv, d]    same dtype as query
  value_cache   [num_blocks, block_size, H_kv, d]    same dtype as query
  bias_cache    [num_blocks, block_size, H_kv]       fp32 or None: 0 normal slot, β compacted slot, -inf padding slot
  block_table   [num_seqs, max_blocks]               int32 / int64 physical block ids, in logical order
  cu_seqlens_q  [num_seqs + 1]                       int, query_start_loc (sequence s owns query rows cu[s]:cu[s+1])
  seq_lens      [num_seqs]                           int, physical KV length incl. the new tokens (seqused_k)
  out           [num_tokens, H_q, d]                 query dtype
Semantics: the j-th of the q_len new tokens of a sequence sees slots [0, seq_len - q_len + j];
logit = scale·q·k + bias[slot]; query head h reads KV head h // (H_q // H_kv). Slots with bias -inf are
skipped without reading K/V (so they may hold garbage), and a row that sees no finite logit outputs 0.

Grid: (q blocks, H_kv). Like vLLM's unified attention (2D path), one program owns BLOCK_Q consecutive new tokens
of one sequence times the G query heads of one KV head (BLOCK_M = BLOCK_Q·G rows), so each K/V tile is loaded
once per GQA group, and runs an online softmax over KV tiles of TILE slots up to the last key its rows may see.
The flat q-block index maps to its sequence by a binary search over ``cu_seqlens_q[s] // BLOCK_Q + s``.
With ``num_splits > 1`` (split-KV, for decode batches with few sequences and long KV) a third grid axis
splits each program's KV range and ``_merge_splits_kernel`` combines the partial (max, sum, acc) states.

The torch reference is :func:`vllm_attnmatch.kernels.reference.paged_attention_bias_ref`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._triton_common import dot, dot_config

__all__ = ["paged_attention_bias_triton"]


@triton.jit
def _find_seq_idx(cu_seqlens_q_ptr, q_block_global, num_seqs, BLOCK_Q: tl.constexpr):
    # Largest s with cu[s] // BLOCK_Q + s <= q_block_global.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        if start <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_attention_bias_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, bias_ptr, block_table_ptr, cu_seqlens_q_ptr, seq_lens_ptr,
    part_acc_ptr, part_m_ptr, part_l_ptr,
    scale, num_seqs, D, H_q,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bb, stride_bs, stride_bh,
    stride_tbl_s, stride_tbl_b,
    NUM_QUERIES_PER_KV: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_idx = _find_seq_idx(cu_seqlens_q_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(cu_seqlens_q_ptr + seq_idx)
    q_len = tl.load(cu_seqlens_q_ptr + seq_idx + 1) - q_start
    q_block_local = q_block_global - (q_start // BLOCK_Q + seq_idx)
    if q_block_local * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_idx)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_in_block = offs_m // NUM_QUERIES_PER_KV
    q_pos = q_block_local * BLOCK_Q + q_in_block  # index among this sequence's new tokens
    head = kv_head * NUM_QUERIES_PER_KV + offs_m % NUM_QUERIES_PER_KV
    row_mask = (q_in_block < BLOCK_Q) & (q_pos < q_len)
    q_row = (q_start + q_pos).to(tl.int64)
    q = tl.load(
        q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    )
    last_key = ctx_len + q_pos  # inclusive causal limit per row

    # Keys beyond what the block's last row can see are never needed.
    kv_end = tl.minimum(ctx_len + tl.minimum((q_block_local + 1) * BLOCK_Q, q_len), seq_len)
    if NUM_SPLITS > 1:  # split-KV: this program covers one contiguous range of whole tiles
        tiles_per_split = tl.cdiv(tl.cdiv(kv_end, TILE), NUM_SPLITS)
        kv_lo = split * tiles_per_split * TILE
        kv_hi = tl.minimum(kv_end, kv_lo + tiles_per_split * TILE)
    else:
        kv_lo = 0
        kv_hi = kv_end
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    tbl_base = block_table_ptr + seq_idx.to(tl.int64) * stride_tbl_s
    for k0 in range(kv_lo, kv_hi, TILE):
        offs_k = k0 + tl.arange(0, TILE)
        k_in = offs_k < kv_hi
        blk = tl.load(tbl_base + (offs_k // BLOCK_SIZE) * stride_tbl_b, mask=k_in, other=0).to(tl.int64)
        slot = offs_k % BLOCK_SIZE
        if HAS_BIAS:
            b = tl.load(bias_ptr + blk * stride_bb + slot * stride_bs + kv_head * stride_bh,
                        mask=k_in, other=float("-inf")).to(tl.float32)
            k_ok = k_in & (b > float("-inf"))
        else:
            k_ok = k_in
        k_t = tl.load(
            k_cache_ptr + blk[None, :] * stride_kb + slot[None, :] * stride_ks + kv_head * stride_kh
            + offs_d[:, None] * stride_kd,
            mask=k_ok[None, :] & d_mask[:, None], other=0.0,
        )
        v = tl.load(
            v_cache_ptr + blk[:, None] * stride_vb + slot[:, None] * stride_vs + kv_head * stride_vh
            + offs_d[None, :] * stride_vd,
            mask=k_ok[:, None] & d_mask[None, :], other=0.0,
        )
        s = dot(q, k_t, DOT_PRECISION, DOT_UPCAST) * scale
        if HAS_BIAS:
            s += tl.where(k_ok, b, 0.0)[None, :]
        valid = row_mask[:, None] & k_ok[None, :] & (offs_k[None, :] <= last_key[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with no finite logit so far keep m = -inf; subtract 0 instead so no inf - inf (NaN) appears.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
        m_i = m_new
    if NUM_SPLITS > 1:
        # Unnormalised partial state, merged by _merge_splits_kernel: [num_tokens, H_q, NUM_SPLITS, (D)].
        part = (q_row * H_q + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_mask)
        tl.store(part_l_ptr + part, l_i, mask=row_mask)
        tl.store(part_acc_ptr + part[:, None] * D + offs_d[None, :], acc, mask=row_mask[:, None] & d_mask[None, :])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
            out, mask=row_mask[:, None] & d_mask[None, :],
        )


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    D, H_q,
    stride_ot, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < D
    part = (token * H_q + head) * NUM_SPLITS + offs_s
    m = tl.load(part_m_ptr + part, mask=s_mask, other=float("-inf"))
    l = tl.load(part_l_ptr + part, mask=s_mask, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * D + offs_d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty splits (m = -inf) weigh 0
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d * stride_od, out, mask=d_mask)


def paged_attention_bias_triton(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    bias_cache: Optional[torch.Tensor],
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor] = None,
    *,
    max_seqlen_q: Optional[int] = None,
    max_seqlen_k: Optional[int] = None,
    num_splits: Optional[int] = None,
    block_m: Optional[int] = None,
    tile: int = 32,
    allow_tf32: bool = False,
) -> torch.Tensor:
    """Causal paged attention with a per-slot additive bias (see module docstring); returns ``out``.

    ``max_seqlen_q``: longest query span in the batch; only picks the tile shape (pass it to avoid a device
    sync; None reads it from ``cu_seqlens_q``). ``num_splits``: split-KV factor — each program covers
    1/num_splits of the KV tiles and a second kernel merges the partial softmax states (fills the GPU for
    decode batches with few sequences and long KV). None: 1, except for decode-only batches on CUDA when
    ``max_seqlen_k`` is given, where it targets ~2 programs per SM with ≥ 16 tiles per split.
    ``block_m``: rows per program (power of two ≥ 16 and ≥ G; default 16 for decode-only batches, 64
    otherwise). ``tile``: KV slots per inner step (power of two ≥ 16). ``allow_tf32``: tf32 dot products for
    fp32 inputs.
    """
    if query.dim() != 3 or key_cache.dim() != 4 or value_cache.dim() != 4:
        raise ValueError("query [num_tokens, H_q, d] and caches [num_blocks, block_size, H_kv, d] expected")
    num_tokens, H_q, d = query.shape
    num_blocks, block_size, H_kv, d_k = key_cache.shape
    if value_cache.shape != key_cache.shape or d_k != d:
        raise ValueError(f"key/value caches must be [num_blocks, block_size, H_kv, {d}], got "
                         f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    if H_q % H_kv:
        raise ValueError(f"H_q={H_q} is not a multiple of H_kv={H_kv}")
    if not (query.dtype == key_cache.dtype == value_cache.dtype) or query.dtype not in (
        torch.float32, torch.float16, torch.bfloat16
    ):
        raise TypeError(f"query and caches must share a float dtype, got {query.dtype}, {key_cache.dtype}, "
                        f"{value_cache.dtype}")
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("block_table must be int32/int64 [num_seqs, max_blocks]")
    num_seqs = block_table.shape[0]
    if cu_seqlens_q.shape != (num_seqs + 1,) or seq_lens.shape != (num_seqs,):
        raise ValueError(f"cu_seqlens_q must be ({num_seqs + 1},) and seq_lens ({num_seqs},), got "
                         f"{tuple(cu_seqlens_q.shape)}, {tuple(seq_lens.shape)}")
    if bias_cache is not None and bias_cache.shape != (num_blocks, block_size, H_kv):
        raise ValueError(f"bias_cache must be [{num_blocks}, {block_size}, {H_kv}], got {tuple(bias_cache.shape)}")
    tensors = [key_cache, value_cache, block_table, cu_seqlens_q, seq_lens]
    tensors += [bias_cache] if bias_cache is not None else []
    if any(t.device != query.device for t in tensors):
        raise ValueError("all tensors must be on the device of query")
    if out is None:
        out = torch.empty_like(query)
    elif out.shape != query.shape:
        raise ValueError(f"out must be {tuple(query.shape)}, got {tuple(out.shape)}")
    if num_tokens == 0 or num_seqs == 0:
        return out

    group = H_q // H_kv
    if (block_m is None or num_splits is None) and max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    if block_m is None:
        block_m = 16 if max_seqlen_q <= 1 else 64
        block_m = max(block_m, triton.next_power_of_2(group))
    if num_splits is None:
        num_splits = 1
        if max_seqlen_q <= 1 and max_seqlen_k is not None and query.is_cuda:
            programs = num_seqs * H_kv
            sms = torch.cuda.get_device_properties(query.device).multi_processor_count
            num_splits = max(1, min(triton.cdiv(2 * sms, programs), max_seqlen_k // (16 * tile), 64))
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if block_m < 16 or block_m & (block_m - 1) or block_m < group:
        raise ValueError(f"block_m must be a power of two >= max(16, H_q/H_kv={group}), got {block_m}")
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 16, got {tile}")
    block_q = block_m // group
    block_d = max(16, triton.next_power_of_2(d))

    if bias_cache is not None:
        bias_arg, sb = bias_cache, bias_cache.stride()
    else:
        bias_arg, sb = query, (0, 0, 0)  # never read (HAS_BIAS=False)
    if num_splits > 1:
        part_acc = torch.empty(num_tokens, H_q, num_splits, d, dtype=torch.float32, device=query.device)
        part_m = torch.empty(num_tokens, H_q, num_splits, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # never written (NUM_SPLITS=1)
    grid = (num_tokens // block_q + num_seqs, H_kv, num_splits)
    _paged_attention_bias_kernel[grid](
        out, query, key_cache, value_cache, bias_arg, block_table, cu_seqlens_q, seq_lens,
        part_acc, part_m, part_l,
        float(scale), num_seqs, d, H_q,
        *query.stride(), *out.stride(), *key_cache.stride(), *value_cache.stride(), *sb,
        block_table.stride(0), block_table.stride(1),
        NUM_QUERIES_PER_KV=group,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_M=block_m,
        TILE=tile,
        BLOCK_D=block_d,
        HAS_BIAS=bias_cache is not None,
        NUM_SPLITS=num_splits,
        **dot_config(query.dtype, allow_tf32, _paged_attention_bias_kernel),
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, H_q)](
            out, part_acc, part_m, part_l, d, H_q, *out.stride(),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(d),
        )
    return out
