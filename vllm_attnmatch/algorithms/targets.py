"""Reference attention targets of one block, per KV head, computed stably in fp32.

Why: every solver (β, values, validation gate) compares the compacted block with the original on the same
reference queries, so the logits, the causal visibility and the max-subtracted exponentials are built once
here. For a query q and block keys K: mass ``Z(q) = Σ_i exp(s_i)`` and block-normalised output
``o(q) = Σ_i exp(s_i) v_i / Z(q)`` with ``s_i = q·k_i·scale + bias_i``. Attention over ``[block; anything
else]`` is unchanged if both are matched, which is what Attention Matching fits.

Causal targets: when the reference queries come from inside the block (the context's own prefill), query
``i`` must only see keys at positions ≤ its own — otherwise the targets describe attention that never
happens at inference (the calibration measured this as a large part of naive AM's loss).

Two ways to get them: :func:`compute_targets` builds the full ``(H, n, T)`` block softmax (OMP needs every
entry); :func:`stream_targets` visits the queries in tiles, in position order, touching only the key prefix a
tile may see, and keeps per-query statistics, per-key score reductions and the outputs of the rows the fit
uses — its work memory is a few ``(H, tile, T)`` tensors whatever the number of queries (issue 13.4).
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
    # Scale the (small) queries, then add and mask in place: on CPU each pass over an (H, n, T) tensor
    # is memory-bound, so the full block's targets cost what the number of passes says.
    s = torch.bmm(queries.float() * scale, keys.float().transpose(1, 2))
    if bias is not None:
        s.add_(bias.float()[:, None, :])
    if visible is not None:
        s.masked_fill_(~visible.unsqueeze(0) if visible.dim() == 2 else ~visible, NEG_INF)
    return s


@dataclass
class Targets:
    """What the compacted block must reproduce, per head and query.

    ``log_mass (H,n)`` is ``log Z(q)`` (``-inf`` for a query that sees no key), ``output (H,n,d)`` the
    block-normalised attention output, ``probs (H,n,T)`` the block softmax (0 where invisible), ``rowmax``
    the per-query max logit used to scale exponentials, ``valid (H,n)`` queries that see at least one key.
    The logits themselves are not kept: the softmax is built in their memory.
    """

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
    e = s.sub_(safe_max.unsqueeze(-1)).exp_()  # in [0, 1], 0 where invisible; in the logits' memory
    z = e.sum(-1)
    probs = e.div_(z.clamp_min(1e-30).unsqueeze(-1))
    output = torch.bmm(probs, values.float())
    log_mass = torch.where(valid, torch.log(z.clamp_min(1e-30)) + safe_max, torch.full_like(z, NEG_INF))
    return Targets(probs, rowmax, log_mass, output, valid)


def block_attention(queries, keys, values, beta, scale, visible=None):
    """Attention of ``queries`` over a (compacted) block with additive ``beta``: ``(log_mass, output)``."""
    t = compute_targets(keys, values, queries, scale, bias=beta, visible=visible)
    return t.log_mass, t.output


#: Reference queries per tile of the streamed pass. The pass holds a few ``(H, tile, T)`` fp32 work
#: tensors at a time, so its memory is bounded by the tile and T, never by the number of queries.
#: Small tiles also follow the causal triangle closely (a tile computes only the keys its latest query
#: sees): at T = 4096 on 2 CPU cores, 128 took the scoring pass from 54 to 32 ms a layer against 512.
DEFAULT_QUERY_TILE = 128


@dataclass
class StreamedTargets:
    """Per-query targets of the whole block from one pass over query tiles (no ``(H, n, T)`` tensor kept).

    ``rowmax``, ``log_mass``, ``valid`` are ``(H, n)`` for every query; ``output (H, m, d)`` only for the
    ``rows (m,)`` asked for (the fit's rows); ``scores`` maps each requested reduction to ``(H, T)``, the
    same numbers :func:`.scoring.reduce_scores` gives on the full block softmax; ``peak_work_bytes`` is the
    largest work tensor set one tile needed.
    """

    rowmax: torch.Tensor
    log_mass: torch.Tensor
    valid: torch.Tensor
    output: torch.Tensor
    rows: torch.Tensor
    scores: dict
    peak_work_bytes: int = 0
    probs: torch.Tensor | None = None  # (H, n, T) block softmax, only when asked for (OMP's design)


def _tile_plan(n: int, T: int, tile: int, query_positions, key_positions, gap: int):
    """Query order and, per tile, ``(rows, visible key count, keys every row sees)``.

    With positions and ascending key positions, queries are visited in position order and a tile only
    touches the key prefix its latest query may see (a causal block costs about half the full product);
    the keys before the third number are visible to every query of the tile, so only the band between the
    two needs a causal mask. Positions are read on the CPU once (n + T integers), so no device sync
    happens per tile.
    """
    if query_positions is None or key_positions is None:
        order = torch.arange(n)
        return order, [(order[a:a + tile], T, T) for a in range(0, n, tile)]
    qp = query_positions.detach().reshape(-1).to("cpu", torch.long)
    kp = key_positions.detach().reshape(-1).to("cpu", torch.long)
    order = torch.argsort(qp, stable=True)
    ascending = bool((kp[1:] >= kp[:-1]).all()) if T > 1 else True
    plan = []
    for a in range(0, n, tile):
        rows = order[a:a + tile]
        if ascending:
            limits = qp[rows[[-1, 0]]] - gap  # rows ascend by position: latest and earliest query
            count, everyone = torch.searchsorted(kp, limits, right=True).tolist()
        else:
            count, everyone = T, 0
        plan.append((rows, count, everyone))
    return order, plan


def stream_targets(keys, values, queries, scale, bias=None, query_positions=None, key_positions=None, gap: int = 0,
                   reductions=(), weights=None, output_rows=None, tile: int = DEFAULT_QUERY_TILE,
                   keep_probs: bool = False) -> StreamedTargets:
    """:func:`compute_targets` and :func:`.scoring.reduce_scores` in one pass over query tiles.

    ``keys, values (H,T,d)``, ``queries (H,n,d)`` fp32 on one device; positions on any device (causal
    visibility with ``gap`` as :func:`visibility`); ``weights (n,)`` or ``(H,n)`` per-query score weights;
    ``output_rows (m,)`` long (None = all) are the rows whose block-normalised output is returned.
    ``keep_probs`` also returns the whole ``(H, n, T)`` block softmax (OMP's design). Built tile by tile,
    it costs what the causal triangle costs: keys a tile cannot see are zero-filled, never multiplied
    or exponentiated, and outputs are only computed for ``output_rows``.
    """
    from .scoring import REDUCTIONS

    unknown = [r for r in reductions if r not in REDUCTIONS]
    if unknown:
        raise ValueError(f"unknown score reduction {unknown[0]!r}; expected one of {REDUCTIONS}")
    H, T, d = keys.shape
    n = queries.shape[1]
    dev = keys.device
    tile = max(1, int(tile))
    rowmax = torch.full((H, n), NEG_INF, device=dev)
    log_mass = torch.full((H, n), NEG_INF, device=dev)
    rows_all = torch.arange(n, device=dev) if output_rows is None else output_rows.to(dev, torch.long)
    # output row slot of each query (-1: not asked for)
    slot = torch.full((n,), -1, dtype=torch.long)
    slot[rows_all.cpu()] = torch.arange(rows_all.numel())
    output = torch.zeros(H, rows_all.numel(), d, device=dev)
    if weights is not None:
        w_all = weights.to(dev, torch.float32).expand(H, n)
    else:
        w_all = torch.ones(H, n, device=dev)
    w_all = w_all / w_all.sum(-1, keepdim=True).clamp_min(1e-30)
    acc = {r: (torch.zeros(H, T, device=dev)) for r in reductions}
    qpos_dev = query_positions.to(dev, torch.long).reshape(-1) if query_positions is not None else None
    kpos_dev = key_positions.to(dev, torch.long).reshape(-1) if key_positions is not None else None
    order, plan = _tile_plan(n, T, tile, query_positions, key_positions, gap)
    # queries already in position order (the subsampled ones are): every tile's rows are a slice
    in_order = bool(torch.equal(order, torch.arange(n)))
    scaled = queries * scale  # once, instead of a pass over every logits tile
    probs = torch.empty(H, n, T, device=dev) if keep_probs else None
    peak = 0
    for rows_cpu, count, everyone in plan:
        rows = rows_cpu.to(dev)
        if probs is not None:
            # a tile of consecutive rows is a view of the softmax, written in place (no index_put)
            tile_probs = probs[:, int(rows_cpu[0]):int(rows_cpu[-1]) + 1] if in_order else None
            if tile_probs is not None:
                tile_probs[:, :, max(count, 0):] = 0.0
            else:
                probs[:, rows, max(count, 0):] = 0.0
        if count <= 0:
            continue  # these queries see no key: rowmax/log_mass stay -inf, output 0, no score
        s = torch.bmm(scaled[:, rows], keys[:, :count].transpose(1, 2))
        if bias is not None:
            s.add_(bias[:, None, :count])
        if qpos_dev is not None and kpos_dev is not None and everyone < count:
            # only the band [everyone, count) holds keys some row of the tile may not see (visibility())
            hidden = kpos_dev[None, everyone:count] > qpos_dev[rows, None] - gap
            s[:, :, everyone:count].masked_fill_(hidden.unsqueeze(0), NEG_INF)
        m = s.amax(dim=-1)
        valid = torch.isfinite(m)
        safe = torch.where(valid, m, torch.zeros_like(m))
        e = s.sub_(safe.unsqueeze(-1)).exp_()  # in [0, 1], 0 where invisible
        z = e.sum(-1)
        rowmax[:, rows] = m
        log_mass[:, rows] = torch.where(valid, torch.log(z.clamp_min(1e-30)) + safe, torch.full_like(z, NEG_INF))
        # The softmax p = e / z is never materialised: outputs and scores scale rows by 1/z instead.
        inv_z = torch.where(valid, 1.0 / z.clamp_min(1e-30), torch.zeros_like(z))  # rows that see nothing: 0
        if probs is not None:
            if tile_probs is not None:
                torch.mul(e, inv_z.unsqueeze(-1), out=tile_probs[:, :, :count])
            else:
                probs[:, rows, :count] = e * inv_z.unsqueeze(-1)
        want = slot[rows_cpu]
        keep = want >= 0
        if bool(keep.any()):
            if bool(keep.all()):
                output[:, want.to(dev)] = torch.bmm(e, values[:, :count]).mul_(inv_z.unsqueeze(-1))
            else:
                k = keep.to(dev)
                output[:, want[keep].to(dev)] = torch.bmm(e[:, k], values[:, :count]).mul_(inv_z[:, k].unsqueeze(-1))
        w = w_all[:, rows]
        for r in reductions:
            if r == "max":
                acc[r][:, :count] = torch.maximum(acc[r][:, :count], (e * inv_z.unsqueeze(-1)).amax(dim=1))
            elif r in ("mean", "sum"):
                acc[r][:, :count] += torch.bmm((w * inv_z).unsqueeze(1), e).squeeze(1)
        if "rms" in reductions:
            acc["rms"][:, :count] += torch.bmm((w * inv_z * inv_z).unsqueeze(1), e.square_()).squeeze(1)
        peak = max(peak, s.numel() * s.element_size() * 2)  # the logits tile and one same-sized temporary
    scores = {}
    for r, a in acc.items():
        scores[r] = a.sqrt() if r == "rms" else (a * n if r == "sum" else a)
    valid = torch.isfinite(rowmax)
    return StreamedTargets(rowmax, log_mass, valid, output, rows_all, scores, peak, probs)
