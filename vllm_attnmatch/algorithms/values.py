"""Compacted values by ridge least squares, shrunk towards the original values of the kept keys.

Why shrink towards ``V[idx]`` and not towards 0: plain least squares on the row-stochastic design
``X = softmax(Q C1ᵀ·scale + β)`` is ill-conditioned (the calibration saw |C2| up to 10³× max|V|, and 10¹²×
with wide β bounds) and the fit does not transfer to queries it was not fitted on. Pulling towards the kept
keys' own values makes λ → ∞ exactly eviction, so the held-out choice of λ decides how far to trust the fit
per head instead of a global constant. λ is data-scaled (``α · tr(XᵀX)/t``) and the whole grid costs one
eigendecomposition per head.
"""

from __future__ import annotations

import torch

DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, float("inf"))


def ridge_path(X: torch.Tensor, Y: torch.Tensor, prior: torch.Tensor, alphas=DEFAULT_ALPHAS):
    """Solutions of ``min ||X C − Y||² + λ||C − prior||²`` for each data-scaled ``λ = α·tr(XᵀX)/t``.

    ``X (H,n,t)``, ``Y (H,n,d)``, ``prior (H,t,d)``. Returns a list of ``(H,t,d)`` (α = inf → prior).
    """
    G = torch.bmm(X.transpose(1, 2), X).double()
    R = torch.bmm(X.transpose(1, 2), Y).double()
    t = G.shape[-1]
    scale = (torch.diagonal(G, dim1=1, dim2=2).sum(-1) / t).clamp_min(1e-30)  # mean eigenvalue
    # One factorisation for every α: (G + λI)⁻¹ = Q (Λ + λ)⁻¹ Qᵀ, and Qᵀ(R + λP) = QᵀR + λ QᵀP.
    evals, evecs = torch.linalg.eigh(G)
    evals = evals.clamp_min(0.0)
    QtR = torch.bmm(evecs.transpose(1, 2), R)
    QtP = torch.bmm(evecs.transpose(1, 2), prior.double())
    out = []
    for a in alphas:
        if a == float("inf"):
            out.append(prior.float().clone())
            continue
        lam = (a * scale)[:, None, None]
        rhs = (QtR + lam * QtP) / (evals[:, :, None] + lam)
        out.append(torch.bmm(evecs, rhs).float())
    return out


def relative_output_error(pred: torch.Tensor, target: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Per head ``sqrt(Σ||pred−target||² / Σ||target||²)`` over ``rows (H,n)`` bool (all if None)."""
    err = (pred - target).pow(2).sum(-1)
    ref = target.pow(2).sum(-1)
    if rows is not None:
        err, ref = err * rows, ref * rows
    return torch.sqrt(err.sum(-1) / ref.sum(-1).clamp_min(1e-30))
