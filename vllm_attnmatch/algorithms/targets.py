"""Reference attention targets of one block, per KV head, computed stably in fp32.

Why: every solver (β, values, validation gate) compares the compacted block with the original on the same
reference queries, so the logits, the causal visibility and the max-subtracted exponentials are built once
here. For a query q and block keys K: mass ``Z(q) = Σ_i exp(s_i)`` and block-normalised output
``o(q) = Σ_i exp(s_i) v_i / Z(q)`` with ``s_i = q·k_i·scale + bias_i``. Attention over ``[block; anything
else]`` is unchanged if both are matched, which is what Attention Matching fits.

Causal targets: when the reference queries come from inside the block (the context's own prefill), query
``i`` must only see keys at positions ≤ its own — otherwise the targets describe attention that never
happens at inference (the calibration measured this as a large part of naive AM's loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def visibility(query_positions: torch.Tensor | None, key_positions: torch.Tensor | None,
               gap: int = 0) -> torch.Tensor | None:
    """``(n, T)`` bool: query may see key (position ≤ own − ``gap``), or ``None`` when a side is unknown.

    ``gap > 0`` ("distant-causal" targets): a context query also ignores its ``gap`` nearest keys. Tokens that
    come after the block serve their local attention from their own new neighbours and look at the block from
    a distance; context queries only resemble them once their local window is removed.
    """
    if query_positions is None or key_positions is None:
        return None
    return key_positions.reshape(1, -1) <= query_positions.reshape(-1, 1) - gap


def logits(queries: torch.Tensor, keys: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
           visible: torch.Tensor | None = None) -> torch.Tensor:
    """``(H, n, T)`` fp32 logits ``q·k·scale + bias``, ``-inf`` where not visible."""
    s = torch.bmm(queries.float(), keys.float().transpose(1, 2)) * scale
    if bias is not None:
        s = s + bias.float()[:, None, :]
    if visible is not None:
        s = s.masked_fill(~visible.unsqueeze(0) if visible.dim() == 2 else ~visible, NEG_INF)
    return s


@dataclass
class Targets:
    """What the compacted block must reproduce, per head and query.

    ``log_mass (H,n)`` is ``log Z(q)`` (``-inf`` for a query that sees no key), ``output (H,n,d)`` the
    block-normalised attention output, ``probs (H,n,T)`` the block softmax (0 where invisible), ``rowmax``
    the per-query max logit used to scale exponentials, ``valid (H,n)`` queries that see at least one key.
    """

    logits: torch.Tensor
    probs: torch.Tensor
    rowmax: torch.Tensor
    log_mass: torch.Tensor
    output: torch.Tensor
    valid: torch.Tensor


def compute_targets(keys, values, queries, scale, bias=None, visible=None) -> Targets:
    s = logits(queries, keys, scale, bias, visible)
    rowmax = s.amax(dim=-1)
    valid = torch.isfinite(rowmax)
    safe_max = torch.where(valid, rowmax, torch.zeros_like(rowmax))
    e = (s - safe_max.unsqueeze(-1)).exp_()  # in [0, 1], 0 where invisible
    z = e.sum(-1)
    probs = e.div_(z.clamp_min(1e-30).unsqueeze(-1))
    output = torch.bmm(probs, values.float())
    log_mass = torch.where(valid, torch.log(z.clamp_min(1e-30)) + safe_max, torch.full_like(z, NEG_INF))
    return Targets(s, probs, rowmax, log_mass, output, valid)


def block_attention(queries, keys, values, beta, scale, visible=None):
    """Attention of ``queries`` over a (compacted) block with additive ``beta``: ``(log_mass, output)``."""
    t = compute_targets(keys, values, queries, scale, bias=beta, visible=visible)
    return t.log_mass, t.output
