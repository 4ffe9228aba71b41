"""Bounded non-negative least squares for the per-key mass weights ``w = exp(β)``, batched over heads.

Why this shape: with the kept keys fixed, matching the block's mass ``Z(q)`` is linear in ``w``. We fit
the *relative* mass (each query's row divided by its own target ``Z(q)``, target 1), so a query is not
weighted by how peaked its logits are. The box ``[lo, hi]`` keeps β storable and stops one key from standing
for an implausible amount of dropped mass; an optional ridge pulls ``w`` towards 1 (β = 0, i.e. plain
eviction), which is what the held-out selection uses to decide how much to trust the fit.

Solved on the normal equations (``t×t``, independent of the number of queries) with accelerated projected
gradient (FISTA), which is exact at convergence for this convex box-constrained problem.
"""

from __future__ import annotations

import torch


def power_norm(G: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Largest eigenvalue of symmetric PSD ``G (H,t,t)``, per head ``(H,)`` (deterministic start)."""
    v = torch.ones(G.shape[0], G.shape[1], 1, dtype=G.dtype, device=G.device)
    for _ in range(iters):
        v = torch.bmm(G, v)
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return (v.transpose(1, 2) @ G @ v).reshape(-1).clamp_min(1e-12)


def nnls_normal(G: torch.Tensor, h: torch.Tensor, lo: float, hi: float, iters: int = 300,
                init: torch.Tensor | None = None) -> torch.Tensor:
    """``argmin_{lo ≤ w ≤ hi} ½ wᵀGw − hᵀw`` per head. ``G (H,t,t)`` PSD, ``h (H,t)``; returns ``(H,t)``."""
    step = 1.0 / power_norm(G)[:, None]
    w = (init.clone() if init is not None else torch.ones_like(h)).clamp(lo, hi)
    y, t_k = w.clone(), 1.0
    for _ in range(iters):
        grad = torch.bmm(G, y.unsqueeze(-1)).squeeze(-1) - h
        w_next = (y - step * grad).clamp(lo, hi)
        t_next = (1.0 + (1.0 + 4.0 * t_k * t_k) ** 0.5) / 2.0
        y = w_next + ((t_k - 1.0) / t_next) * (w_next - w)
        w, t_k = w_next, t_next
    return w


def nnls(A: torch.Tensor, y: torch.Tensor, lo: float = 0.0, hi: float = float("inf"), ridge: float = 0.0,
         prior: torch.Tensor | None = None, row_weights: torch.Tensor | None = None, iters: int = 300) -> torch.Tensor:
    """Bounded least squares ``min ||A w − y||² + ridge·||w − prior||²`` s.t. ``lo ≤ w ≤ hi``.

    ``A (H,n,t)``, ``y (H,n)``, optional ``row_weights (H,n)`` (0 drops a row). ``ridge`` is absolute here;
    callers scale it by the data (mean eigenvalue of ``AᵀA``).
    """
    if row_weights is not None:
        A = A * row_weights.unsqueeze(-1)
        y = y * row_weights
    G = torch.bmm(A.transpose(1, 2), A)
    h = torch.bmm(A.transpose(1, 2), y.unsqueeze(-1)).squeeze(-1)
    if ridge > 0:
        p = torch.ones_like(h) if prior is None else prior
        G = G + ridge * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
        h = h + ridge * p
    return nnls_normal(G, h, lo, hi, iters=iters, init=prior)
