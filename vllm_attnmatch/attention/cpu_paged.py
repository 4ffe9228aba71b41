"""Torch reads of vLLM's CPU paged KV cache, and attention over it with a per-slot bias β.

Layout (vLLM 0.32 CPU_ATTN): a layer's cache is ``[num_blocks, H_kv, block_size, 2*d]``; viewed as
``[num_blocks, H_kv, 2*block_size, d]`` the first ``block_size`` rows of a (block, head) hold its K and the
next ``block_size`` rows its V, each packed in a way that depends on the ISA vLLM picked for the dtype and
CPU: ``vec``/``vec16`` store K *transposed* (``d × block_size``) and V row-major; ``amx`` (bf16 on CPUs
with AMX) interleaves pairs for its tile instructions; ``neon`` (ARM) has its own. Rather than copy each
packing, :func:`probe_layout` learns one by writing probe values through vLLM's own cache op and reading
where they landed: a :class:`KVLayout` is the resulting map (checked to be a one-to-one placement).
β lives in a side tensor ``[num_blocks, H_kv, block_size]`` whatever the packing.

Why torch: the stock C++ kernel has no per-slot bias. This path runs only for compacted requests; the
others keep the stock kernel. No vLLM import (the cache op is passed in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class KVLayout:
    """Where token ``t``, dimension ``j`` of one (block, head) lives in its flat ``2·block_size·d``
    storage: ``key_index[t, j]`` for K, ``value_index[t, j]`` for V (both ``(block_size, d)`` long)."""

    key_index: torch.Tensor
    value_index: torch.Tensor

    @property
    def block_size(self) -> int:
        return int(self.key_index.shape[0])

    @cached_property
    def key_strides(self) -> tuple[int, int, int] | None:
        return _affine(self.key_index)

    @cached_property
    def value_strides(self) -> tuple[int, int, int] | None:
        return _affine(self.value_index)


def _affine(index: torch.Tensor) -> tuple[int, int, int] | None:
    """``(offset, token stride, dim stride)`` when ``index[t, j] = offset + t·st + j·sj`` (the ``vec``
    packings: a strided view reads it, ~2.5× faster than an element-wise gather on the decode path),
    else None (e.g. ``amx``'s interleaved pairs: read element by element)."""
    block_size, head_dim = index.shape
    offset = int(index[0, 0])
    st = int(index[1, 0]) - offset if block_size > 1 else 0
    sj = int(index[0, 1]) - offset if head_dim > 1 else 0
    t, j = torch.arange(block_size)[:, None], torch.arange(head_dim)[None, :]
    return (offset, st, sj) if torch.equal(index, offset + t * st + j * sj) else None


def vec_layout(block_size: int, head_dim: int) -> KVLayout:
    """The ``vec``/``vec16`` packing: K transposed, then V row-major."""
    t = torch.arange(block_size)[:, None]
    j = torch.arange(head_dim)[None, :]
    return KVLayout(key_index=j * block_size + t, value_index=block_size * head_dim + t * head_dim + j)


#: Writes ``keys``/``values`` ``(n, H_kv=1, d)`` into slots ``0..n-1`` of a one-block, one-head cache
#: ``[1, 1, block_size, 2d]`` in the cache's own packing (vLLM's ``cpu_attn_reshape_and_cache``).
CacheWrite = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]

_DIGIT_BITS = 4  # probe values 1..16: exact in fp32, fp16 and bf16


def probe_layout(write: CacheWrite, block_size: int, head_dim: int, dtype: torch.dtype) -> KVLayout:
    """Learn the packing ``write`` uses: write K = V = one base-16 digit of the token index (then of the
    dimension index) and read back where each digit landed. Raises ``ValueError`` if the result is not a
    one-to-one placement of every (token, dim) of K and of V."""
    cache = torch.zeros(1, 1, block_size, 2 * head_dim, dtype=dtype)
    flat = cache.view(-1)

    def decode(count: int, index_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        out = torch.zeros(flat.numel(), dtype=torch.long)
        shift = 0
        while (1 << shift) < count:
            t = torch.arange(block_size)[:, None].expand(block_size, head_dim)
            j = torch.arange(head_dim)[None, :].expand(block_size, head_dim)
            probe = ((index_of(t, j) >> shift) & ((1 << _DIGIT_BITS) - 1)) + 1
            probe = probe.to(dtype)[:, None, :].contiguous()
            cache.zero_()
            write(probe, probe, cache)
            digit = flat.float().round().long() - 1
            if ((digit < 0) | (digit >= (1 << _DIGIT_BITS))).any():
                raise ValueError("the cache op left slots unwritten or changed the probe values")
            out += digit << shift
            shift += _DIGIT_BITS
        return out

    token = decode(block_size, lambda t, j: t)
    dim = decode(head_dim, lambda t, j: j)
    half = block_size * head_dim
    layout = KVLayout(key_index=torch.empty(block_size, head_dim, dtype=torch.long),
                      value_index=torch.empty(block_size, head_dim, dtype=torch.long))
    halves = ((layout.key_index, torch.arange(half)), (layout.value_index, torch.arange(half, 2 * half)))
    for index, positions in halves:
        t, j = token[positions], dim[positions]
        if (t >= block_size).any() or (j >= head_dim).any():
            raise ValueError("probe decoded to a token or dimension out of range")
        seen = torch.zeros(block_size, head_dim, dtype=torch.bool)
        seen[t, j] = True
        if not bool(seen.all()):
            raise ValueError("the cache packing is not a one-to-one placement of (token, dim)")
        index[t, j] = positions
    return layout


def gather_kv(
    kv_cache: torch.Tensor, block_ids, length: int, layout: KVLayout | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the first ``length`` slots of ``block_ids``, each ``(H_kv, length, d)``, read through
    ``layout`` (default: the ``vec`` packing)."""
    block_ids = torch.as_tensor(block_ids, dtype=torch.long)
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    if layout is None:
        layout = vec_layout(block_size, head_dim)
    raw = kv_cache.view(num_blocks, num_heads, 2 * block_size * head_dim)[block_ids]  # (n, H, 2·bs·d)
    n = raw.shape[0]

    def read(index: torch.Tensor, strides: tuple[int, int, int] | None) -> torch.Tensor:
        picked = _unpack(raw, index, strides)
        return picked.permute(1, 0, 2, 3).reshape(num_heads, n * block_size, head_dim)[:, :length]

    return read(layout.key_index, layout.key_strides), read(layout.value_index, layout.value_strides)


def _unpack(raw: torch.Tensor, index: torch.Tensor, strides: tuple[int, int, int] | None) -> torch.Tensor:
    """``(n, H, block_size, d)`` K or V of ``n`` copied blocks ``raw`` ``(n, H, 2·bs·d)``: a strided view
    for affine packings, an element-wise gather otherwise."""
    n, num_heads, _ = raw.shape
    block_size, head_dim = index.shape
    if strides is None:
        return raw[:, :, index.reshape(-1)].view(n, num_heads, block_size, head_dim)
    offset, st, sj = strides
    return raw.as_strided((n, num_heads, block_size, head_dim), (raw.stride(0), raw.stride(1), st, sj),
                          raw.storage_offset() + offset)


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
    # (H_kv, G·q_len, d): one batched product per KV head (a decode step is G rows against the whole KV)
    q = query.float().view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, -1, head_dim)
    scores = torch.baddbmm(bias.float()[:, None, :], q, keys.float().transpose(1, 2), alpha=scale)
    if q_len > 1:  # a single (decode) query sees every key
        key_pos = torch.arange(length)
        query_pos = torch.arange(length - q_len, length).repeat(group)
        scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
    out = torch.bmm(torch.softmax(scores, dim=-1), values.float())  # (H_kv, G·q_len, d)
    return out.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_q_heads, head_dim)


def paged_attention_with_bias(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    bias: torch.Tensor,
    block_table_row: torch.Tensor,
    seq_len: int,
    scale: float,
    layout: KVLayout | None = None,
) -> torch.Tensor:
    """:func:`attention_with_bias` for one request whose KV lives in paged blocks."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    ids = block_table_row[:num_blocks].long()
    keys, values = gather_kv(kv_cache, ids, seq_len, layout)
    return attention_with_bias(query, keys, values, gather_bias(bias, ids, seq_len), scale)


@dataclass(frozen=True)
class DecodeBatch:
    """The single-token (decode) rows of compacted requests in one step, prepared once per step and used by
    every layer: token indices into the step's query tensor, each request's block ids padded to the
    longest, and an additive mask (0 for a request's live slots, -inf past its length)."""

    tokens: torch.Tensor  # (R,) long
    block_ids: torch.Tensor  # (R, B) long
    mask: torch.Tensor  # (R, 1, B·block_size) float32

    @classmethod
    def of(cls, tokens, block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int) -> DecodeBatch:
        """``block_tables`` (R, ≥B) and ``seq_lens`` (R,) of the decode rows' requests."""
        seq_lens = seq_lens.long()
        blocks = int(-(-int(seq_lens.max()) // block_size))
        used = -(-seq_lens // block_size)  # a request's own blocks; the table's entries past them may be stale
        ids = block_tables[:, :blocks].long()
        ids = ids.masked_fill(torch.arange(blocks)[None, :] >= used[:, None], 0)  # read block 0, masked anyway
        slots = torch.arange(blocks * block_size)
        mask = torch.zeros(len(seq_lens), 1, blocks * block_size)
        mask.masked_fill_(slots[None, None, :] >= seq_lens[:, None, None], float("-inf"))
        return cls(torch.as_tensor(tokens, dtype=torch.long), ids, mask)


def decode_attention_with_bias(query: torch.Tensor, kv_cache: torch.Tensor, bias: torch.Tensor, batch: DecodeBatch,
                               scale: float, layout: KVLayout) -> torch.Tensor:
    """Attention with β of every decode row of ``batch`` at once (a fixed dozen tensor ops per layer,
    however many compacted requests decode): ``(R, H_q, d)`` fp32 outputs of ``query[batch.tokens]``.

    With the ``vec`` packing each block already holds Kᵀ (``d × block_size``) and V (``block_size × d``)
    contiguously, so scores and outputs are computed block by block straight from the copied blocks, with
    no transposing read of K or V; other packings are read into ``(H, L, d)`` first."""
    num_blocks, num_heads, block_size, two_d = kv_cache.shape
    head_dim = two_d // 2
    requests, blocks = batch.block_ids.shape
    flat = batch.block_ids.reshape(-1)
    raw = kv_cache.view(num_blocks, num_heads, 2 * block_size * head_dim).index_select(0, flat).float()  # (R·B, H, 2·bs·d)
    group = query.shape[1] // num_heads
    q = query.index_select(0, batch.tokens).float().view(requests, 1, num_heads, group, head_dim)
    beta = bias.index_select(0, flat).float().view(requests, blocks, num_heads, 1, block_size)
    beta = beta + batch.mask.view(requests, blocks, 1, 1, block_size)
    if _is_vec(layout, block_size, head_dim):
        keys_t = raw[:, :, : block_size * head_dim].view(requests, blocks, num_heads, head_dim, block_size)
        values = raw[:, :, block_size * head_dim:].view(requests, blocks, num_heads, block_size, head_dim)
    else:
        keys_t = _unpack(raw, layout.key_index, layout.key_strides).transpose(-1, -2)
        keys_t = keys_t.reshape(requests, blocks, num_heads, head_dim, block_size)
        values = _unpack(raw, layout.value_index, layout.value_strides).reshape(requests, blocks, num_heads,
                                                                                 block_size, head_dim)
    scores = torch.matmul(q * scale, keys_t) + beta  # (R, B, H, G, bs)
    # softmax over all of a request's slots: its blocks × block_size
    joint = scores.permute(0, 2, 3, 1, 4).reshape(requests, num_heads, group, blocks * block_size)
    weights = torch.softmax(joint, dim=-1).view(requests, num_heads, group, blocks, block_size).permute(0, 3, 1, 2, 4)
    out = torch.matmul(weights, values).sum(dim=1)  # (R, H, G, d)
    return out.reshape(requests, num_heads * group, head_dim)


def _is_vec(layout: KVLayout, block_size: int, head_dim: int) -> bool:
    """Kᵀ then V, each contiguous within a (block, head): what the block-wise decode reads without copies."""
    return layout.key_strides == (0, 1, block_size) and layout.value_strides == (block_size * head_dim, head_dim, 1)


@dataclass(frozen=True)
class BiasedRows:
    """Where a step's compacted rows are, read once per step (every layer shares the step's block tables
    and lengths): the decode rows as one :class:`DecodeBatch`, the multi-token rows (prefill chunks over
    a compacted prefix) as ``(start, end, batch row, seq_len)``."""

    decode: DecodeBatch | None
    chunks: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def of(cls, rows: list[int], query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
           block_size: int) -> BiasedRows:
        starts, lengths = query_start_loc.tolist(), seq_lens.tolist()
        single = [r for r in rows if starts[r + 1] - starts[r] == 1]
        chunks = tuple((starts[r], starts[r + 1], r, lengths[r]) for r in rows if starts[r + 1] - starts[r] > 1)
        decode = None
        if single:
            index = torch.tensor(single, dtype=torch.long)
            decode = DecodeBatch.of([starts[r] for r in single], block_table.index_select(0, index),
                                    seq_lens.index_select(0, index), block_size)
        return cls(decode, chunks)


def attend_biased_rows(plan: BiasedRows, query: torch.Tensor, kv_cache: torch.Tensor, bias: torch.Tensor,
                       block_table: torch.Tensor, scale: float, layout: KVLayout, output: torch.Tensor) -> None:
    """Overwrite ``output`` at the compacted rows with their attention with β: all decode rows in one batch,
    each prefill chunk on its own (it needs a causal mask of its own length)."""
    if plan.decode is not None:
        out = decode_attention_with_bias(query, kv_cache, bias, plan.decode, scale, layout)
        output.index_copy_(0, plan.decode.tokens, out.reshape(-1, *output.shape[1:]).to(output.dtype))
    for start, end, row, seq_len in plan.chunks:
        out = paged_attention_with_bias(query[start:end], kv_cache, bias, block_table[row], seq_len, scale, layout)
        output[start:end] = out.reshape(output[start:end].shape).to(output.dtype)
