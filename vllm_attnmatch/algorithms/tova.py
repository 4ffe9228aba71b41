"""TOVA baseline — Oren et al. 2024, "Transformers are Multi-State RNNs" (EMNLP 2024, arXiv 2401.06104):
Token Omission Via Attention.

What it scores: TOVA runs the context token by token with a cache of fixed size; whenever the cache is
over the budget, it drops the key with the lowest attention from the *current* query, the softmax taken
over the keys still in the cache and averaged over all heads of the layer (the paper's layer-wise policy:
one kept set shared by every head). Here the prefill's own queries replay that process exactly: queries
come in position order and each evicts down to the budget. The same attention sinks as AM are never
evicted. Keys after the last reference query were never scored; they stay, as TOVA always keeps the
newest token. Without query positions (re-compaction of a running request) the one-shot form kvpress
uses applies: the mean attention of the given queries. β = 0, original values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import CompactionInputs, Method, register
from .eviction import accumulated_attention, keep

#: query positions whose logits are computed at once (bounds memory at H × G·CHUNK × T doubles)
CHUNK_POSITIONS = 256


@register("tova")
@dataclass
class TOVA(Method):
    """Parameters
    ----------
    sinks : first keys never evicted (the same attention sinks as AM).
    """

    sinks: int = 4
    max_queries = None
    query_gap = 0

    def select(self, inp: CompactionInputs) -> torch.Tensor:
        t, H, T = inp.target, inp.num_heads, inp.length
        if inp.query_positions is None or inp.key_positions is None or inp.queries.shape[1] == 0:
            shared = accumulated_attention(inp).sum(0, keepdim=True)
            return keep(shared.expand(H, T), t, self.sinks, 0)
        return self._replay(inp).expand(H, t).clone()

    def _replay(self, inp: CompactionInputs) -> torch.Tensor:
        """The token-by-token eviction, as numpy steps over logits computed in position chunks (one small
        softmax per query position; per-step torch calls cost ~20× more on CPU)."""
        t, T = inp.target, inp.length
        kpos = inp.key_positions.cpu().numpy()
        if not (np.diff(kpos) >= 0).all():
            raise ValueError("tova: key positions must be ascending")
        qpos = inp.query_positions.to(inp.queries.device)
        order = torch.argsort(qpos, stable=True)
        positions, counts = torch.unique_consecutive(qpos[order], return_counts=True)
        positions, counts = positions.cpu().numpy(), counts.cpu().numpy()
        ends = np.cumsum(counts)
        dead = np.zeros(T, dtype=np.float64)  # 0 alive, -inf evicted
        protect = np.zeros(T, dtype=bool)
        protect[: min(self.sinks, t)] = True
        last = np.zeros(T)
        alive_n = 0
        for c0 in range(0, len(positions), CHUNK_POSITIONS):
            c1 = min(c0 + CHUNK_POSITIONS, len(positions))
            lo = ends[c0] - counts[c0]
            rows = order[lo:ends[c1 - 1]]
            s = torch.bmm(inp.queries[:, rows], inp.keys.transpose(1, 2)) * inp.scale
            if inp.bias is not None:
                s = s + inp.bias[:, None, :]
            logits = s.double().cpu().numpy()  # (H, rows, T)
            for i in range(c0, c1):
                p = positions[i]
                visible = int(np.searchsorted(kpos, p, side="right"))
                alive_n = visible - int(np.isneginf(dead[:visible]).sum())
                if alive_n <= t:
                    continue  # the cache is not full yet: nothing to drop
                a, b = ends[i] - counts[i] - lo, ends[i] - lo
                x = logits[:, a:b, :visible] + dead[:visible]
                x = x.reshape(-1, visible)
                e = np.exp(x - x.max(-1, keepdims=True))
                score = (e / e.sum(-1, keepdims=True)).mean(0)  # averaged over every head of the layer
                last[:] = 0.0
                last[:visible] = score
                score = np.where(protect[:visible] | np.isneginf(dead[:visible]), np.inf, score)
                n_drop = alive_n - t
                drop = [int(score.argmin())] if n_drop == 1 else np.argpartition(score, n_drop - 1)[:n_drop]
                dead[drop] = -np.inf
        alive = ~np.isneginf(dead)
        if int(alive.sum()) > t:  # keys after the last query: keep the newest, drop the lowest scored
            rank = np.where(kpos > positions[-1], 1e30 + kpos, last)
            rank = np.where(protect, np.inf, np.where(alive, rank, -np.inf))
            kept = np.sort(np.argpartition(-rank, t - 1)[:t])
        else:
            kept = np.nonzero(alive)[0]
        return torch.as_tensor(kept[:t], dtype=torch.long, device=inp.keys.device)
