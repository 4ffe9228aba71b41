"""Compacted values by ridge least squares, shrunk towards the original values of the kept keys.

Why shrink towards ``V[idx]`` and not towards 0: plain least squares on the row-stochastic design
``X = softmax(Q C1ᵀ·scale + β)`` is ill-conditioned (the calibration saw |C2| up to 10³× max|V|, and 10¹²×
with wide β bounds) and the fit does not transfer to queries it was not fitted on. Pulling towards the kept
keys' own values makes λ → ∞ exactly eviction, so the held-out choice of λ decides how far to trust the fit
per head instead of a global constant. λ is data-scaled (``α · tr(XᵀX)/t``) and the whole grid costs one
Gram matrix and one batched Cholesky factorisation.
"""

from __future__ import annotations

import torch

DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, float("inf"))


def ridge_path(X: torch.Tensor, Y: torch.Tensor, prior: torch.Tensor, alphas=DEFAULT_ALPHAS,
               dtype: torch.dtype = torch.float64):
    """Solutions of ``min ||X C − Y||² + λ||C − prior||²`` for each data-scaled ``λ = α·tr(XᵀX)/t``.

    ``X (H,n,t)``, ``Y (H,n,d)``, ``prior (H,t,d)``. Returns a list of ``(H,t,d)`` (α = inf → prior).

    One Gram matrix for every α, and one batched Cholesky factorisation of all the ``G + λI`` together
    (float64): at t ≈ 400 that is ~3× cheaper on CPU than one eigendecomposition of G, which stays as
    the fallback should a factorisation fail. With at most half as many rows as keys (a short fit, or few
    reference queries) the same solutions come from the ``n×n`` system of the rows instead,
    ``C = prior + Xᵀ(XXᵀ + λI)⁻¹(Y − X·prior)``: at n = 192, t = 409 that factorises 5× faster.
    ``dtype`` is the precision of the solve; float32 halves its memory traffic and falls back to float64
    where a factorisation fails.
    """
    H, n, t = X.shape
    dual = n <= t // 2  # below that, the rows' system no longer pays for its extra products
    G = (torch.bmm(X, X.transpose(1, 2)) if dual else torch.bmm(X.transpose(1, 2), X)).to(dtype)
    R = (Y - torch.bmm(X, prior) if dual else torch.bmm(X.transpose(1, 2), Y)).to(dtype)
    d = prior.shape[-1]
    scale = (torch.diagonal(G, dim1=1, dim2=2).sum(-1) / t).clamp_min(1e-30)  # mean eigenvalue of XᵀX
    finite = [a for a in alphas if a != float("inf")]
    solved: list[torch.Tensor] = []
    if finite:
        m = len(finite)
        lam = (torch.tensor(finite, dtype=G.dtype, device=G.device)[:, None] * scale[None, :]).reshape(-1, 1, 1)
        rhs = R.repeat(m, 1, 1)
        if not dual:
            rhs = rhs + lam * prior.to(dtype).repeat(m, 1, 1)
        system = G.repeat(m, 1, 1)
        system.diagonal(dim1=1, dim2=2).add_(lam.reshape(-1, 1))
        L, info = torch.linalg.cholesky_ex(system)
        if not bool((info == 0).all()):
            if dtype != torch.float64:
                return ridge_path(X, Y, prior, alphas, torch.float64)
            sol = _eig_solve(G, rhs, lam, m)
        else:
            sol = torch.cholesky_solve(rhs, L)
        if dual:
            # Xᵀ·(per-α solutions) as one product per head: (H,t,n) × (H,n,m·d), X never repeated
            per_head = sol.reshape(m, H, n, d).permute(1, 2, 0, 3).reshape(H, n, m * d)
            step = torch.bmm(X.transpose(1, 2).to(dtype), per_head).reshape(H, t, m, d).permute(2, 0, 1, 3)
            sol = prior.to(dtype).unsqueeze(0) + step
        solved = list(sol.float().reshape(m, H, t, d).unbind(0))
    out, it = [], iter(solved)
    for a in alphas:
        out.append(prior.float().clone() if a == float("inf") else next(it))
    return out


def _eig_solve(G, rhs, lam, m):
    """``(G + λI)⁻¹ rhs`` for ``m`` stacked λ through one eigendecomposition of ``G`` (the robust path)."""
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.clamp_min(0.0).repeat(m, 1), evecs.repeat(m, 1, 1)
    return torch.bmm(evecs, torch.bmm(evecs.transpose(1, 2), rhs) / (evals[:, :, None] + lam))


def relative_output_error(pred: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per head ``sqrt(Σ||pred−target||² / Σ||target||²)`` over ``rows (H,n)`` bool (all if None)."""
    err = (pred - target).pow(2).sum(-1)
    ref = target.pow(2).sum(-1)
    if rows is not None:
        err, ref = err * rows, ref * rows
    return torch.sqrt(err.sum(-1) / ref.sum(-1).clamp_min(1e-30))
