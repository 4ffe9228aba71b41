"""Plain torch references for every kernel in this package.

These are what the CPU path of the engine runs, and what the Triton kernels are tested against. They must
stay importable without triton and without vLLM, compute in fp32 whatever the input dtype, and never
produce NaN for fully masked rows (those yield zeros, and a log-sum-exp of -inf).

Paged layout (vLLM TRITON_ATTN backend): ``key_cache`` / ``value_cache`` ``[num_blocks, block_size, H_kv, d]``
and the per-slot additive bias ``bias_cache`` ``[num_blocks, block_size, H_kv]`` fp32 (0 for normal slots,
β for compacted ones, -inf for padding slots). Any strides are accepted. The CPU_ATTN backend stores K
transposed inside a block and is *not* this layout.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

__all__ = [
    "KeyScores",
    "GatheredKV",
    "key_scores_ref",
    "paged_attention_bias_ref",
    "gather_paged_kv_ref",
    "scatter_paged_kv_ref",
]


class KeyScores(NamedTuple):
    """Per-key statistics of the row-softmax attention ``p[q, i]`` of ``n`` queries over ``T`` keys.

    ``max``, ``mean``, ``rms``: ``(H_kv, T)`` fp32 — max over queries of ``p``, ``mean_q p`` and
    ``sqrt(mean_q p²)``; the mean is over all ``n`` queries (a query that cannot see a key contributes 0).
    ``lse``: ``(H_kv, n)`` fp32 — per-query ``log Σ_i exp(s[q, i])`` over the keys it sees (-inf if none),
    where ``s = scale·q·k + bias``.
    """

    max: torch.Tensor
    mean: torch.Tensor
    rms: torch.Tensor
    lse: torch.Tensor


class GatheredKV(NamedTuple):
    """Per-head tensors gathered from the paged layout: keys, values ``(H_kv, T, d)``; bias ``(H_kv, T)`` fp32
    or None when no bias cache was given."""

    keys: torch.Tensor
    values: torch.Tensor
    bias: Optional[torch.Tensor]


def _check_causal(query_positions, key_positions, n: int, T: int) -> bool:
    if (query_positions is None) != (key_positions is None):
        raise ValueError("query_positions and key_positions must be given together (or neither)")
    if query_positions is None:
        return False
    if query_positions.shape != (n,) or key_positions.shape != (T,):
        raise ValueError(
            f"query_positions must be ({n},) and key_positions ({T},), got "
            f"{tuple(query_positions.shape)} and {tuple(key_positions.shape)}"
        )
    return True


def key_scores_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    query_positions: Optional[torch.Tensor] = None,
    key_positions: Optional[torch.Tensor] = None,
) -> KeyScores:
    """Reference for :func:`key_scores_triton`: materialises the full ``(H_kv, n, T)`` matrix in fp32.

    queries ``(H_kv, n, d)``, keys ``(H_kv, T, d)``, bias ``(H_kv, T)`` (added to the scaled logits, -inf masks
    a key), causal when positions are given: query q sees key i iff ``key_positions[i] <= query_positions[q]``.
    """
    if queries.dim() != 3 or keys.dim() != 3 or queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(
            f"queries (H, n, d) and keys (H, T, d) expected, got {tuple(queries.shape)}, {tuple(keys.shape)}"
        )
    H, n, _ = queries.shape
    T = keys.shape[1]
    causal = _check_causal(query_positions, key_positions, n, T)
    s = torch.einsum("hnd,htd->hnt", queries.float(), keys.float()) * float(scale)
    if bias is not None:
        if bias.shape != (H, T):
            raise ValueError(f"bias must be ({H}, {T}), got {tuple(bias.shape)}")
        s = s + bias.float()[:, None, :]
    if causal:
        visible = key_positions.to(queries.device)[None, :] <= query_positions.to(queries.device)[:, None]
        s = s.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no visible key
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = torch.where(torch.isinf(lse)[..., None], torch.zeros_like(p), p)
    if n == 0:
        z = torch.zeros(H, T, dtype=torch.float32, device=queries.device)
        return KeyScores(z, z.clone(), z.clone(), lse)
    return KeyScores(
        p.amax(dim=1),
        p.mean(dim=1),
        p.square().mean(dim=1).sqrt(),
        lse,
    )


def _seq_kv(cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Logical slots ``[0, num_tokens)`` of a request from ``cache[num_blocks, block_size, ...]``."""
    block_size = cache.shape[1]
    nblk = -(-num_tokens // block_size)
    if block_ids.numel() < nblk:
        raise ValueError(f"{num_tokens} tokens need {nblk} blocks, got {block_ids.numel()}")
    flat = cache[block_ids[:nblk].long()]  # (nblk, bs, ...)
    return flat.reshape(nblk * block_size, *cache.shape[2:])[:num_tokens]


def paged_attention_bias_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    bias_cache: Optional[torch.Tensor],
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference for :func:`paged_attention_bias_triton` (gather blocks, full fp32 softmax per sequence).

    query ``[num_tokens, H_q, d]``; caches ``[num_blocks, block_size, H_kv, d]``; bias_cache
    ``[num_blocks, block_size, H_kv]`` or None; block_table ``[num_seqs, max_blocks]``; cu_seqlens_q
    ``[num_seqs+1]``; seq_lens ``[num_seqs]`` (KV length including the new tokens). The j-th of the ``q_len``
    new tokens sees keys ``[0, seq_len - q_len + j]``; query head h uses KV head ``h // (H_q // H_kv)``.
    Rows with no finite logit give 0. Returns ``[num_tokens, H_q, d]`` in the query dtype.
    """
    num_tokens, H_q, d = query.shape
    H_kv = key_cache.shape[2]
    if H_q % H_kv:
        raise ValueError(f"H_q={H_q} is not a multiple of H_kv={H_kv}")
    group = H_q // H_kv
    if out is None:
        out = torch.empty_like(query)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for s_idx in range(len(lens)):
        q0, q1 = cu[s_idx], cu[s_idx + 1]
        q_len, seq_len = q1 - q0, lens[s_idx]
        if q_len == 0:
            continue
        k = _seq_kv(key_cache, block_table[s_idx], seq_len).float()  # (L, H_kv, d)
        v = _seq_kv(value_cache, block_table[s_idx], seq_len).float()
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        q = query[q0:q1].float()  # (q_len, H_q, d)
        s = torch.einsum("qhd,khd->hqk", q, k) * float(scale)
        if bias_cache is not None:
            b = _seq_kv(bias_cache, block_table[s_idx], seq_len).float().repeat_interleave(group, dim=1)  # (L, H_q)
            dead = torch.isneginf(b)  # (L, H_q): padding slots, whose K/V may hold garbage (even NaN)
            s = (s + b.t()[:, None, :]).masked_fill(dead.t()[:, None, :], float("-inf"))
            v = v.masked_fill(dead[..., None], 0.0)
        ctx = seq_len - q_len
        visible = torch.arange(seq_len, device=query.device)[None, :] <= (
            ctx + torch.arange(q_len, device=query.device)
        )[:, None]
        s = s.masked_fill(~visible[None], float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = torch.exp(s - m)
        denom = e.sum(dim=-1, keepdim=True)
        o = torch.einsum("hqk,khd->qhd", e, v) / torch.where(denom == 0, torch.ones_like(denom), denom).permute(1, 0, 2)
        out[q0:q1] = o.to(out.dtype)
    return out


def gather_paged_kv_ref(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_tokens: int,
    bias_cache: Optional[torch.Tensor] = None,
) -> GatheredKV:
    """Reference for :func:`gather_paged_kv_triton`: logical slots ``[0, num_tokens)`` of one request.

    caches ``[num_blocks, block_size, H_kv, d]`` → keys/values ``(H_kv, T, d)`` (cache dtype, contiguous);
    bias_cache ``[num_blocks, block_size, H_kv]`` → bias ``(H_kv, T)`` fp32.
    """
    keys = _seq_kv(key_cache, block_ids, num_tokens).transpose(0, 1).contiguous()
    values = _seq_kv(value_cache, block_ids, num_tokens).transpose(0, 1).contiguous()
    bias = None
    if bias_cache is not None:
        bias = _seq_kv(bias_cache, block_ids, num_tokens).t().float().contiguous()
    return GatheredKV(keys, values, bias)


def scatter_paged_kv_ref(
    keys: torch.Tensor,
    values: torch.Tensor,
    beta: Optional[torch.Tensor],
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    bias_cache: Optional[torch.Tensor],
    block_ids: torch.Tensor,
    start_slot: int = 0,
    pad_tail: bool = True,
) -> None:
    """Reference for :func:`scatter_paged_kv_triton` (in place).

    Writes keys/values ``(H_kv, t, d)`` and beta ``(H_kv, t)`` into logical slots ``[start_slot, start_slot+t)``
    of the request whose blocks are ``block_ids``. With ``pad_tail`` every later slot of the given blocks
    becomes a padding slot: key 0, value 0, bias -inf. ``beta=None`` writes bias 0 (when a bias cache is given).
    """
    H, t, d = keys.shape
    block_size = key_cache.shape[1]
    if beta is not None and bias_cache is None:
        raise ValueError("beta given but no bias_cache to write it to")
    end = block_ids.numel() * block_size if pad_tail else start_slot + t
    if start_slot + t > block_ids.numel() * block_size:
        raise ValueError(f"slots [{start_slot}, {start_slot + t}) do not fit in {block_ids.numel()} blocks")
    slots = torch.arange(start_slot, end, device=key_cache.device)
    blk = block_ids.to(key_cache.device).long()[slots // block_size]
    off = slots % block_size
    n_pad = end - start_slot - t
    k = torch.cat([keys.transpose(0, 1), keys.new_zeros(n_pad, H, d)]) if n_pad else keys.transpose(0, 1)
    v = torch.cat([values.transpose(0, 1), values.new_zeros(n_pad, H, d)]) if n_pad else values.transpose(0, 1)
    key_cache[blk, off] = k.to(key_cache.dtype)
    value_cache[blk, off] = v.to(value_cache.dtype)
    if bias_cache is not None:
        b = beta.t().float() if beta is not None else torch.zeros(t, H, device=keys.device)
        if n_pad:
            b = torch.cat([b, torch.full((n_pad, H), float("-inf"), device=keys.device)])
        bias_cache[blk, off] = b.to(bias_cache.dtype)
