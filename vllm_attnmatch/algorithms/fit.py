"""Fit β and values for a chosen key subset, and keep the fit only where it helps on held-out queries.

Why the held-out machinery: the calibration showed a fit that is excellent on its own reference queries
and worse than plain eviction on the continuation. So every degree of freedom is chosen on queries the fit
did not see: the ridge on β (towards β = 0), the ridge on values (towards ``V[idx]``), and finally a
per-head gate that falls back to the plain kept entries (β = old bias, original values) when the fitted
block does not beat them on held-out attention error. Everything is batched over heads.

Cost: the fit only sees its own rows (queries at or after the ``fit_from`` quantile of positions, whose
targets the streamed pass kept), the Gram matrices use the training rows and every error the held-out
rows; each of the β and value fits factorises once for all its ridge strengths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .nnls import matvec, nnls_normal
from .values import DEFAULT_ALPHAS, relative_output_error, ridge_path

INF = float("inf")


_VALUE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class FitConfig:
    """Knobs of the β / value fit.

    Parameters
    ----------
    fit_beta, fit_values : fit β by bounded NNLS / values by ridge least squares (else β = 0, V[idx]).
    beta_bounds : box for β (log-mass weight); keeps β storable and plausible.
    beta_ridges : data-scaled ridge strengths towards β = 0 tried on held-out queries (inf = no β).
        Default (0, inf): with the early-stopped solver below, intermediate ridges changed nothing measurable.
    value_alphas : data-scaled ridge strengths towards V[idx] tried on held-out queries (inf = V[idx]).
    heldout_fraction : share of reference queries held out for the selections and the gate.
    gate : per head, keep the fitted β/values only if they beat the plain kept entries on held-out queries.
    value_clip : |C2| ≤ value_clip · max|V| of the head (a last guard; bf16-safe).
    mass_weight : weight of the held-out log-mass error next to the relative output error in the gate.
    nnls_iters, nnls_warm_start : projected-gradient (FISTA) steps for β, started from β = 0 (cold) or from
        the clamped unconstrained solution (warm). Cold + 150 steps is *early-stopped* NNLS: it regularises
        towards β = 0 along the poorly determined directions, and it transferred to the continuation far
        better than the converged solution (continuation KL at ratio 0.1 on GPL-3: 0.096 vs 0.140).
    heldout : ``latest`` holds out the queries at the latest positions (they resemble what follows the
        context best), ``random`` a random subset; ``latest`` needs query positions, else random.
    fit_from : fit and gate only with queries whose position is at or after this quantile of positions
        (0 = all); early context queries see few keys and describe attention that later tokens never do.
    value_dtype : precision of the value ridge solves, ``float64`` or ``float32`` (float32 falls back to
        float64 where a factorisation fails). float32 by default: on every layer of a 4096-token DEV
        prefill (the default preset, r = 0.1) it chose the same ridge and gate in 30/30 layers, with
        values within 7.3e-5 relative and the same held-out error, in 0.70x the time
        (``python -m benchmarks.suites.value_precision``, ``benchmarks/results/value_precision_dev.md``).
    """

    fit_beta: bool = True
    fit_values: bool = True
    beta_bounds: tuple[float, float] = (-3.0, 3.0)
    beta_ridges: tuple[float, ...] = (0.0, INF)
    value_alphas: tuple[float, ...] = DEFAULT_ALPHAS
    heldout_fraction: float = 0.25
    gate: bool = True
    value_clip: float = 2.0
    mass_weight: float = 1.0
    nnls_iters: int = 150
    nnls_warm_start: bool = False
    heldout: str = "latest"
    fit_from: float = 0.5
    value_dtype: str = "float32"

    def __post_init__(self):
        if self.value_dtype not in _VALUE_DTYPES:
            raise ValueError(f"value_dtype must be one of {tuple(_VALUE_DTYPES)}, got {self.value_dtype!r}")


@dataclass
class FitResult:
    beta: torch.Tensor  # (H,t) fp32, includes the old bias of the kept keys
    values: torch.Tensor  # (H,t,d) fp32
    heldout_output_error: torch.Tensor  # (H,)
    heldout_mass_error: torch.Tensor  # (H,)
    plain_output_error: torch.Tensor  # (H,)
    plain_mass_error: torch.Tensor  # (H,)
    choice: torch.Tensor  # (H,) 0 = plain, 1 = β only, 2 = β + values
    info: dict = field(default_factory=dict)


def heldout_split(n: int, fraction: float, generator: torch.Generator | None, device,
                  positions: torch.Tensor | None = None, mode: str = "latest") -> torch.Tensor:
    """``(n,)`` bool, True = held out. With very few queries everything is used for both."""
    held = torch.zeros(n, dtype=torch.bool)
    k = int(round(n * fraction))
    if n >= 8 and k >= 1:
        if mode == "latest" and positions is not None:
            pos = positions.float().cpu()
            held = pos >= torch.quantile(pos, 1.0 - fraction)
            if held.all() or not held.any():
                held = torch.zeros(n, dtype=torch.bool)
                held[torch.argsort(pos, descending=True, stable=True)[:k]] = True
        elif mode in ("latest", "random"):
            perm = torch.randperm(n, generator=generator)
            held[perm[:k]] = True
        else:
            raise ValueError(f"heldout must be 'latest' or 'random', got {mode!r}")
    return held.to(device)


@dataclass
class FitTargets:
    """What the fit needs on its own rows (``m`` queries): the kept keys' logits ``s_k (H,m,t)`` (old bias
    included, ``-inf`` where not visible), and the full block's ``rowmax``, ``log_mass``, ``valid`` ``(H,m)``
    and block-normalised ``output (H,m,d)``."""

    s_k: torch.Tensor
    rowmax: torch.Tensor
    log_mass: torch.Tensor
    output: torch.Tensor
    valid: torch.Tensor


def _softmax_rows(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis that maps all ``-inf`` rows to zeros instead of NaN."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def _mass_error(A: torch.Tensor, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per head RMS of ``log(Ẑ/Z)`` over ``rows``; ``A`` is the relative mass design (target 1)."""
    ratio = matvec(A, w).clamp_min(1e-6)
    err = torch.log(ratio).pow(2) * rows
    return torch.sqrt(err.sum(-1) / rows.sum(-1).clamp_min(1))


def fit_block(targets: FitTargets, values: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
              cfg: FitConfig, heldout: torch.Tensor, clock=None) -> FitResult:
    """β and values for kept keys ``idx (H,t)`` given the fit rows' targets; ``heldout (m,)`` bool.

    ``clock`` (optional, ``mark(name)``) records the time of the β fit and of the value fit.
    """
    s_k = targets.s_k
    H, n, t = s_k.shape
    bias_k = torch.gather(bias.float(), 1, idx) if bias is not None else torch.zeros(H, t, device=idx.device)
    V0 = torch.gather(values.float(), 1, idx.unsqueeze(-1).expand(H, t, values.shape[-1]))
    valid = targets.valid
    train = valid & ~heldout.unsqueeze(0)
    held = valid & heldout.unsqueeze(0)
    if not heldout.any():
        train = held = valid
    # Relative mass design: row q divided by its own target Z(q) so every query counts alike.
    safe_max = torch.where(valid, targets.rowmax, torch.zeros_like(targets.rowmax))
    z_scaled = torch.exp(targets.log_mass - safe_max).where(valid, torch.ones_like(safe_max))
    A = torch.exp(s_k - safe_max.unsqueeze(-1)).div_(z_scaled.unsqueeze(-1))
    A.mul_(valid.unsqueeze(-1))
    ones_w = torch.ones(H, t, device=idx.device)
    lo, hi = math.exp(cfg.beta_bounds[0]), math.exp(cfg.beta_bounds[1])
    # The held-out rows are few: every error below is measured on them only.
    held_rows = heldout.nonzero().squeeze(-1) if heldout.any() else torch.arange(n, device=idx.device)
    held_h = held[:, held_rows]
    train_rows = train.any(0).nonzero().squeeze(-1)
    train_t = train[:, train_rows]
    A_h, s_h, out_h = A[:, held_rows], s_k[:, held_rows], targets.output[:, held_rows]

    def design(s, w):
        return _softmax_rows(s + torch.log(w).unsqueeze(1))

    def out_err(X, C2):
        return relative_output_error(torch.bmm(X, C2), out_h, held_h)

    X1_h = design(s_h, ones_w)
    plain_mass = _mass_error(A_h, ones_w, held_h)
    plain_out = out_err(X1_h, V0)
    info: dict = {}

    # --- β: bounded NNLS on train rows, ridge towards w = 1 chosen on held-out mass error.
    w = ones_w
    if cfg.fit_beta:
        At = A[:, train_rows] * train_t.unsqueeze(-1)
        finite = [mu for mu in cfg.beta_ridges if mu != INF]
        cands = list(_nnls_ridge_path(At, train_t, lo, hi, finite, cfg.nnls_iters, cfg.nnls_warm_start)) if finite else []
        cands += [ones_w for mu in cfg.beta_ridges if mu == INF]
        order = finite + [mu for mu in cfg.beta_ridges if mu == INF]
        errs_t = torch.stack([_mass_error(A_h, w_mu, held_h) for w_mu in cands])  # (M,H)
        best = errs_t.argmin(0)
        w = torch.stack(cands)[best, torch.arange(H, device=best.device)]
        info["beta_ridge"] = [order[i] for i in best.tolist()]
    if clock is not None:
        clock.mark("beta")

    # --- values: ridge towards V[idx] on train rows, α chosen on held-out output error.
    C2 = V0
    X_h = design(s_h, w) if cfg.fit_beta else X1_h
    if cfg.fit_values:
        tw = train_t.unsqueeze(-1).float()
        X_t = design(s_k[:, train_rows], w)
        path = ridge_path(X_t * tw, targets.output[:, train_rows] * tw, V0, cfg.value_alphas,
                          _VALUE_DTYPES[cfg.value_dtype])
        vmax = values.float().abs().amax(dim=(1, 2)).clamp_min(1e-6)[:, None, None] * cfg.value_clip
        path = [torch.maximum(torch.minimum(p, vmax), -vmax) for p in path]
        errs = torch.stack([out_err(X_h, p) for p in path])
        best = errs.argmin(0)
        C2 = torch.stack(path)[best, torch.arange(H, device=best.device)]
        info["value_alpha"] = [cfg.value_alphas[i] for i in best.tolist()]
    if clock is not None:
        clock.mark("values")

    # --- gate: plain (0), β only (1), β + values (2); lowest held-out combined error wins per head.
    options = [(ones_w, V0), (w, V0), (w, C2)]
    outs = torch.stack([out_err(Xi, ci) for Xi, (wi, ci) in zip((X1_h, X_h, X_h), options)])
    masses = torch.stack([_mass_error(A_h, wi, held_h) for wi, _ in options])
    score = outs + cfg.mass_weight * masses
    choice = score.argmin(0) if cfg.gate else torch.full((H,), 2, dtype=torch.long, device=idx.device)
    ar = torch.arange(H, device=idx.device)
    w_final = torch.stack([o[0] for o in options])[choice, ar]
    C2_final = torch.stack([o[1] for o in options])[choice, ar]
    beta = (torch.log(w_final) + bias_k).float()
    return FitResult(beta, C2_final.float(), outs[choice, ar], masses[choice, ar], plain_out, plain_mass,
                     choice, info)


def _nnls_ridge_path(At, rows, lo, hi, ridges, iters, warm_start=True):
    """Bounded NNLS towards w = 1 for every ridge at once (stacked on the batch axis: one loop, not M).

    The ridge is data-scaled per head: ``mu · mean eigenvalue of AᵀA``.
    """
    H, n, t = At.shape
    G = torch.bmm(At.transpose(1, 2), At)
    h = torch.bmm(rows.float().unsqueeze(1), At).squeeze(1)  # Atᵀ·rows as a row vector (see nnls.matvec)
    scale = (torch.diagonal(G, dim1=1, dim2=2).sum(-1) / t).clamp_min(1e-30)
    mus = torch.tensor(ridges, dtype=G.dtype, device=G.device)
    lam = (mus[:, None] * scale[None, :]).reshape(-1)  # (M·H,)
    eye = torch.eye(t, dtype=G.dtype, device=G.device)
    Gs = G.repeat(len(ridges), 1, 1) + lam[:, None, None] * eye
    hs = h.repeat(len(ridges), 1) + lam[:, None]
    if warm_start:
        # Warm start: the clamped unconstrained solution (tiny jitter keeps it defined), so a few dozen
        # projected-gradient steps finish the box-constrained problem. One eigendecomposition of AᵀA
        # serves every ridge strength: (G + λI)⁻¹ = Q (Λ + λ)⁻¹ Qᵀ.
        evals, evecs = torch.linalg.eigh(G.double())
        evals = evals.clamp_min(0.0).repeat(len(ridges), 1)
        evecs = evecs.repeat(len(ridges), 1, 1)
        denom = evals + (lam + 1e-6 * scale.repeat(len(ridges))).double()[:, None]
        rhs = torch.bmm(hs.double().unsqueeze(1), evecs).squeeze(1) / denom  # Qᵀh as a row vector
        init = matvec(evecs, rhs).float()
        init = torch.where(torch.isfinite(init), init, torch.ones_like(init)).clamp(lo, hi)
    else:
        init = torch.ones_like(hs)  # cold start: the early-stopped path from β = 0 is the regulariser
    w = nnls_normal(Gs, hs, lo, hi, iters=iters, init=init)
    return w.reshape(len(ridges), H, t).unbind(0)
