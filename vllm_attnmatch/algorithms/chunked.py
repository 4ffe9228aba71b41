"""Chunked compaction: compact contiguous chunks of a long block independently and concatenate.

Why it is exact in spirit: attention over a union of chunks decomposes into each chunk's mass and
block-normalised output, so matching each chunk separately matches the whole; cost and memory scale with
the chunk, not the context. Each chunk keeps ``budget`` proportional to its length.
"""

from __future__ import annotations

import torch

from .base import CompactionResult, compact, sum_timings


def compact_chunked(keys, values, queries, target: int, chunk_tokens: int, method: str = "highest_attention",
                    **options) -> CompactionResult:
    """Like :func:`compact`, chunk by chunk along T; ``target`` is split in proportion to chunk lengths."""
    H, T, d = keys.shape
    if chunk_tokens <= 0 or chunk_tokens >= T:
        return compact(keys, values, queries, target, method, **options)
    bounds = list(range(0, T, chunk_tokens)) + [T]
    spans = list(zip(bounds[:-1], bounds[1:]))
    # Largest-remainder split of the budget, at least 1 per chunk.
    raw = [target * (b - a) / T for a, b in spans]
    alloc = [max(1, int(r)) for r in raw]
    rest = target - sum(alloc)
    for i in sorted(range(len(spans)), key=lambda i: raw[i] - int(raw[i]), reverse=True):
        if rest <= 0:
            break
        if alloc[i] < spans[i][1] - spans[i][0]:
            alloc[i] += 1
            rest -= 1
    bias = options.pop("bias", None)
    kpos = options.pop("key_positions", None)
    parts = []
    for (a, b), t_c in zip(spans, alloc):
        opts = dict(options)
        if bias is not None:
            opts["bias"] = bias[:, a:b]
        if kpos is not None:
            opts["key_positions"] = kpos[a:b]
        r = compact(keys[:, a:b], values[:, a:b], queries, min(t_c, b - a), method, **opts)
        r.indices = r.indices + a
        parts.append(r)
    errs = [p.fit_error for p in parts]
    return CompactionResult(
        torch.cat([p.keys for p in parts], 1), torch.cat([p.beta for p in parts], 1),
        torch.cat([p.values for p in parts], 1), torch.cat([p.indices for p in parts], 1), method=method,
        fit_error=float(torch.tensor(errs).nanmean()) if errs else float("nan"),
        seconds=sum(p.seconds for p in parts), info={"chunks": len(parts)}, timings=sum_timings(parts))
