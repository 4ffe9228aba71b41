"""KVzip's reconstruction score — Kim et al. 2025, "KVzip: Query-Agnostic KV Cache Compression with Context
Reconstruction" (arXiv 2505.23416).

What it scores: the model is asked to repeat the context verbatim, teacher-forced over its own cache; a
cached key's importance is the **largest** attention any query of that repetition gives it (over the
repeated positions and the query heads that share the KV head), with attention normalised over
everything those queries see: the context, the repeat prompt and the repetition so far. A fact that a
later question needs is a fact the repetition must copy, and copying attends to it sharply, however few
queries do; a sum over queries (H2O, AM's ``sum``) rewards what every query looks at instead.

Published strength: max over all repetition queries and grouped heads, full softmax over the whole
sequence, no recent window. (KVzip also ranks heads globally; with vLLM's uniform paged layout every KV
head keeps the same number of entries, so this is its uniform-budget variant.)
"""

from __future__ import annotations

import torch


def reconstruction_scores(queries: torch.Tensor, keys: torch.Tensor, query_positions: torch.Tensor,
                          block_len: int, scale: float, chunk: int = 128) -> torch.Tensor:
    """``(H, block_len)`` max attention of the repetition's queries on the first ``block_len`` keys.

    queries : ``(H, n, d)`` the repetition's queries, the G query heads of each KV head pooled
        (``group_queries`` layout), at ``query_positions (n,)`` in the full sequence.
    keys : ``(H, L, d)`` every key of the sequence (context, repeat prompt, repetition), positions 0..L-1.
    Each query attends causally (keys at or before its own position), softmax over all of them.
    ``chunk`` rows at a time: the passes over a chunk's scores are memory-bound, and a 128-row chunk
    stays in cache (a 2k-token document on 2 CPU cores: 291 -> 153 ms a layer against 1024 rows).
    """
    H, n, _ = queries.shape
    L = keys.shape[1]
    if block_len > L:
        raise ValueError(f"block of {block_len} keys but only {L} keys given")
    out = torch.zeros(H, block_len, dtype=torch.float32, device=keys.device)
    k = keys.float().transpose(1, 2)
    pos = torch.arange(L, device=keys.device)
    for start in range(0, n, chunk):
        q = queries[:, start:start + chunk].float() * scale
        s = torch.bmm(q, k)
        hidden = pos[None, :] > query_positions[start:start + chunk].to(keys.device)[:, None]
        s.masked_fill_(hidden[None], float("-inf"))
        p = torch.softmax(s, dim=-1)[:, :, :block_len]
        out = torch.maximum(out, p.amax(dim=1))
    return out


def reconstruction_scores_from_lse(queries: torch.Tensor, context_keys: torch.Tensor, lse: torch.Tensor, scale: float,
                                   chunk: int = 256) -> torch.Tensor:
    """The same score as :func:`reconstruction_scores`, for queries that all come after the context (the
    repetition), given each query's log-sum-exp over everything it sees (the attention kernel returns it).

    Why: ``max_q softmax(q)[k] = exp(max_q (q·k·scale - lse_q))``, so only the context's columns are
    scored, with no softmax over the whole sequence and one ``exp`` per key instead of per entry (a 2k-token
    document re-read on 2 CPU cores: the scores took ~45 % of the pass). Every context key is visible to
    every such query, so no mask is needed.

    queries : ``(H, n, d)`` grouped like :func:`reconstruction_scores`'s; ``lse`` : ``(H, n)`` in the same
    row order; ``context_keys`` : ``(H, T, d)`` the keys scored.
    """
    H, n, _ = queries.shape
    k = context_keys.float().transpose(1, 2)
    best = torch.full((H, context_keys.shape[1]), float("-inf"), dtype=torch.float32, device=context_keys.device)
    for start in range(0, n, chunk):
        s = torch.bmm(queries[:, start:start + chunk].float() * scale, k)
        s.sub_(lse[:, start:start + chunk, None].float())
        best = torch.maximum(best, s.amax(dim=1))
    return best.exp_()
