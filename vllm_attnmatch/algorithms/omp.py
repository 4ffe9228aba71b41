"""Attention Matching with OMP key selection (the paper's higher-quality method).

Why greedy on mass: choosing keys jointly with their weights (orthogonal matching pursuit on the relative
mass design, whose columns are the block softmax) picks keys that *cover* the dropped mass, not just the
individually loudest ones. Per step the ``k`` keys most correlated with the residual are added; NNLS is
re-solved every ``nnls_every`` steps; keys whose β falls below ``drop_beta`` are dropped and refilled.
β and values are finally refitted and gated on held-out queries like every AM method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import CompactionInputs, Method, register
from .nnls import matvec, nnls_normal
from .scoring import protected_mask


@register("omp")
@dataclass
class OMP(Method):
    """Parameters
    ----------
    keys_per_step : keys added per greedy step (the authors' "k4").
    nnls_every : re-solve the weights every this many steps ("int2").
    progressive : grow the step size with the selection (≈10 % of the current size), for speed.
    beta_bounds : box for β during selection.
    drop_beta : keys whose β falls below this are dropped and their slots refilled.
    sinks : first keys forced in.
    recent : last keys forced in, as a fraction of the budget (the continuation leans on them).
    nnls_iters : projected-gradient iterations per NNLS solve (warm-started).
    """

    keys_per_step: int = 4
    nnls_every: int = 2
    progressive: bool = True
    beta_bounds: tuple[float, float] = (-7.0, 7.0)
    drop_beta: float = -7.0
    sinks: int = 4
    recent: float = 0.65
    nnls_iters: int = 60
    fits = True

    def select(self, inp: CompactionInputs) -> torch.Tensor:
        A = inp.targets.probs  # relative mass design: row q = exp(s_q)/Z(q), target 1
        H, n, T = A.shape
        t = inp.target
        dev = A.device
        y = inp.targets.valid.float()
        forced = protected_mask(T, t, self.sinks, int(self.recent * t), dev)
        selected = forced.expand(H, T).clone()
        w_full = torch.zeros(H, T, device=dev)
        w_full[selected] = 1.0
        lo, hi = math.exp(self.beta_bounds[0]), math.exp(self.beta_bounds[1])
        ar = torch.arange(T, device=dev)
        step, drops = 0, 0
        max_steps = 4 * t + 16
        design = _SelectedColumns(A, y, forced.nonzero().squeeze(-1).expand(H, -1), room=t + t // 4 + 8)
        # A·w kept up to date from the selected columns only, so each step reads the (H,n,T) design once
        # (for Aᵀ·resid), not twice: the selection is memory-bound on that design.
        Aw = matvec(A, w_full)
        while step < max_steps:
            counts = selected.sum(-1)
            need = t - counts
            if int(need.max()) <= 0:
                break
            corr = torch.bmm((y - Aw).unsqueeze(1), A).squeeze(1).masked_fill(selected, float("-inf"))  # Aᵀ·resid
            k = self.keys_per_step
            if self.progressive:
                k = max(k, int(0.1 * int(counts.min())))
            k = min(k, int(need.max()))
            top = torch.topk(corr, k, dim=-1).indices  # (H,k)
            take = torch.arange(k, device=dev).unsqueeze(0) < need.unsqueeze(1)
            rows = torch.arange(H, device=dev).unsqueeze(1).expand(H, k)
            selected[rows[take], top[take]] = True
            w_full[rows[take], top[take]] = 1.0
            added = design.add(top, take)
            Aw = Aw + added.sum(-1)
            step += 1
            if step % self.nnls_every == 0 or int((t - selected.sum(-1)).max()) <= 0:
                w_full = design.solve(w_full, lo, hi, self.nnls_iters)
                if drops < 3:
                    low = selected & (w_full < math.exp(self.drop_beta) * 1.0001)
                    low &= ~forced
                    if low.any():
                        selected &= ~low
                        w_full[low] = 0.0
                        design.drop(low)
                        drops += 1
                Aw = design.times(w_full)
        # Heads that could not fill (degenerate inputs) take the best remaining by score.
        counts = selected.sum(-1)
        if int((t - counts).max()) > 0:
            fill = inp.targets.probs.sum(1).masked_fill(selected, float("-inf"))
            for h in range(H):
                need = t - int(counts[h])
                if need > 0:
                    selected[h, torch.topk(fill[h], need).indices] = True
        idx = torch.stack([ar[selected[h]][:t] for h in range(H)])
        return idx


class _SelectedColumns:
    """The selected columns of the design ``A (H,n,T)`` in the order they were chosen, with their Gram
    matrix and ``Aᵀy`` grown as columns arrive.

    Why: each NNLS re-solve needs ``AsᵀAs`` over the selection. Rebuilding it (and re-gathering ``As``)
    at every solve cost more than the greedy steps themselves; a step only adds ``k`` columns, so only
    their products with the columns already there are new. Dropped or never-taken slots stay as zero
    columns: their Gram rows, columns and ``Aᵀy`` entries are zero, so they decouple from the solve.
    The slots live in buffers with room to spare (appending never copies what is there).
    """

    def __init__(self, A: torch.Tensor, y: torch.Tensor, cols: torch.Tensor, room: int):
        self.A, self.y = A, y
        H, n, _ = A.shape
        self._cols = torch.zeros(H, room, dtype=torch.long, device=A.device)
        self._valid = torch.zeros(H, room, dtype=torch.bool, device=A.device)
        self._As = torch.zeros(H, n, room, device=A.device)
        self._G = torch.zeros(H, room, room, device=A.device)
        self._h = torch.zeros(H, room, device=A.device)
        self.size = 0
        self.add(cols, torch.ones_like(cols, dtype=torch.bool))

    @property
    def cols(self):
        return self._cols[:, :self.size]

    @property
    def valid(self):
        return self._valid[:, :self.size]

    def _grow(self, extra: int) -> None:
        room = self._cols.shape[1]
        if self.size + extra <= room:
            return
        new_room = max(self.size + extra, room + room // 2)
        for name in ("_cols", "_valid", "_h"):
            old = getattr(self, name)
            buf = old.new_zeros(old.shape[0], new_room)
            buf[:, :room] = old
            setattr(self, name, buf)
        As = self._As.new_zeros(self._As.shape[0], self._As.shape[1], new_room)
        As[:, :, :room] = self._As
        G = self._G.new_zeros(self._G.shape[0], new_room, new_room)
        G[:, :room, :room] = self._G
        self._As, self._G = As, G

    def add(self, top: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """Append the columns ``top (H,k)`` where ``take``; returns them ``(H,n,k)`` (zero where not taken)."""
        k = top.shape[1]
        self._grow(k)
        s, e = self.size, self.size + k
        new = self._As[:, :, s:e]
        torch.gather(self.A, 2, top.unsqueeze(1).expand(-1, self.A.shape[1], -1), out=new)
        new.mul_(take.unsqueeze(1))
        if s:
            torch.bmm(self._As[:, :, :s].transpose(1, 2), new, out=self._G[:, :s, s:e])
            self._G[:, s:e, :s] = self._G[:, :s, s:e].transpose(1, 2)
        self._G[:, s:e, s:e] = torch.bmm(new.transpose(1, 2), new)
        self._h[:, s:e] = matvec(new.transpose(1, 2), self.y)
        self._cols[:, s:e] = top
        self._valid[:, s:e] = take
        self.size = e
        return new

    def drop(self, low: torch.Tensor) -> None:
        """Zero the slots whose column is marked in ``low (H,T)``."""
        s = self.size
        gone = torch.gather(low, 1, self.cols) & self.valid
        self._valid[:, :s] &= ~gone
        keep = self.valid.to(self._As.dtype)
        self._As[:, :, :s].mul_(keep.unsqueeze(1))
        self._G[:, :s, :s].mul_(keep.unsqueeze(1)).mul_(keep.unsqueeze(2))
        self._h[:, :s].mul_(keep)

    def solve(self, w_full: torch.Tensor, lo: float, hi: float, iters: int) -> torch.Tensor:
        """Bounded NNLS on the selection, warm-started from ``w_full``; returns the full ``(H,T)`` weights."""
        s = self.size
        init = torch.gather(w_full, 1, self.cols).clamp(lo, hi)
        w = nnls_normal(self._G[:, :s, :s], self._h[:, :s], lo, hi, iters=iters, init=init)
        out = torch.zeros_like(w_full)
        # valid slots only: a dropped column picked again has a dead slot too, and scatter_ with repeated
        # indices keeps an arbitrary one
        heads = torch.arange(w.shape[0], device=w.device).unsqueeze(1).expand_as(self.cols)
        out[heads[self.valid], self.cols[self.valid]] = w[self.valid]
        return out

    def times(self, w_full: torch.Tensor) -> torch.Tensor:
        """``A·w`` over the selected columns only ``(H,n)``."""
        return matvec(self._As[:, :, :self.size], torch.gather(w_full, 1, self.cols) * self.valid)
