"""Torch reads of vLLM's CPU paged KV cache, and attention over it with a per-slot bias β.

Layout (vLLM 0.32 CPU_ATTN, ISA ``vec``/``vec16``, verified against the C++ kernel): a layer's cache is
``[num_blocks, H_kv, block_size, 2*d]``; viewed as ``[num_blocks, H_kv, 2*block_size, d]`` the first
``block_size`` rows of a (block, head) hold K *transposed* (``d × block_size``) and the next
``block_size`` rows hold V row-major. β lives in a side tensor ``[num_blocks, H_kv, block_size]``.

Why torch: the stock C++ kernel has no per-slot bias. This path runs only for compacted requests; the
others keep the stock kernel. No vLLM import.
"""

from __future__ import annotations

import torch

SUPPORTED_ISAS = ("vec", "vec16")


def _blocks(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    view = kv_cache.view(num_blocks, num_heads, 2 * block_size, head_dim)
    return view[block_ids], block_size, head_dim


def gather_kv(kv_cache: torch.Tensor, block_ids, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``length`` slots of ``block_ids``, each ``(H_kv, length, d)``."""
    block_ids = torch.as_tensor(block_ids, dtype=torch.long)
    blk, block_size, head_dim = _blocks(kv_cache, block_ids)
    n, num_heads = blk.shape[0], blk.shape[1]
    keys = blk[:, :, :block_size].reshape(n, num_heads, head_dim, block_size).transpose(2, 3)
    keys = keys.permute(1, 0, 2, 3).reshape(num_heads, n * block_size, head_dim)[:, :length]
    values = blk[:, :, block_size:].permute(1, 0, 2, 3).reshape(num_heads, n * block_size, head_dim)
    return keys, values[:, :length]


def gather_bias(bias: torch.Tensor, block_ids, length: int) -> torch.Tensor:
    """β of the first ``length`` slots of ``block_ids``: ``(H_kv, length)``."""
    block_ids = torch.as_tensor(block_ids, dtype=torch.long)
    sel = bias[block_ids]  # (n, H, bs)
    return sel.permute(1, 0, 2).reshape(sel.shape[1], -1)[:, :length]


def write_bias(bias: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
    """Set β of physical ``slots`` (t,) to ``values`` (H_kv, t)."""
    block_size = bias.shape[2]
    bias[slots // block_size, :, slots % block_size] = values.T.to(bias.dtype)


def attention_with_bias(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the last ``q_len`` positions of a sequence over its whole KV.

    query ``(q_len, H_q, d)``; keys/values ``(H_kv, L, d)``; bias ``(H_kv, L)``. Query ``j`` sees keys
    ``[0, L - q_len + j]``. Query heads ``h*G .. h*G+G-1`` share KV head ``h`` (vLLM's GQA order).
    Returns ``(q_len, H_q, d)`` in fp32.
    """
    q_len, num_q_heads, head_dim = query.shape
    num_kv_heads, length, _ = keys.shape
    group = num_q_heads // num_kv_heads
    q = query.float().view(q_len, num_kv_heads, group, head_dim)
    scores = torch.einsum("qhgd,hkd->hgqk", q, keys.float()) * scale + bias.float()[:, None, None, :]
    key_pos = torch.arange(length)
    query_pos = torch.arange(length - q_len, length)
    scores = scores.masked_fill(key_pos[None, :] > query_pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hgqk,hkd->qhgd", probs, values.float())
    return out.reshape(q_len, num_q_heads, head_dim)


def paged_attention_with_bias(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    bias: torch.Tensor,
    block_table_row: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    """:func:`attention_with_bias` for one request whose KV lives in paged blocks."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    ids = block_table_row[:num_blocks].long()
    keys, values = gather_kv(kv_cache, ids, seq_len)
    return attention_with_bias(query, keys, values, gather_bias(bias, ids, seq_len), scale)
