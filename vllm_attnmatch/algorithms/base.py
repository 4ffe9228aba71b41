"""The compaction entry point, the result type, and the method registry.

Why one entry point: the engine, the benchmarks and the tests all call :func:`compact` with the method
name from the request (``am_method``); a method only says how it *selects* keys (and whether β/values are
fitted), kvpress-style. Everything shared — fp32 targets, causal visibility, query subsampling, the
held-out fit and gate, bounds, the t = T shortcut — lives here once.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .fit import FitConfig, FitResult, FitTargets, fit_block, heldout_split
from .scoring import reduce_scores
from .targets import DEFAULT_QUERY_TILE, StreamedTargets, logits, stream_targets, visibility

REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


@dataclass
class CompactionInputs:
    """What a method sees for one (layer) block: fp32 tensors on one device, positions as long tensors on
    that device, and lazily computed targets.

    Two views of the reference attention, both computed at most once:
    - :attr:`targets`: the same streamed pass keeping the full ``(H, n, T)`` block softmax, for methods
      that need every entry (OMP);
    - :meth:`scores`: per-key reductions over queries, streamed over query tiles together with what the fit
      needs (:attr:`fit_stats`), so the default path never holds an ``(H, n, T)`` tensor.
    """

    keys: torch.Tensor  # (H,T,d)
    values: torch.Tensor  # (H,T,d)
    queries: torch.Tensor  # (H,n,d)
    target: int
    scale: float
    bias: torch.Tensor | None  # (H,T)
    query_positions: torch.Tensor | None  # (n,) long, on the keys' device
    key_positions: torch.Tensor | None  # (T,) long, on the keys' device
    generator: torch.Generator
    gap: int = 0
    causal: bool = True
    query_tile: int = DEFAULT_QUERY_TILE
    fit_rows: torch.Tensor | None = None  # (m,) rows whose outputs the fit needs (None = all)
    key_scores: torch.Tensor | None = None  # (H,T) importance computed elsewhere (e.g. KVzip), replaces the reductions
    _targets: StreamedTargets | None = None
    _streamed: StreamedTargets | None = None
    _visible: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    @property
    def is_causal(self) -> bool:
        return self.causal and self.query_positions is not None and self.key_positions is not None

    @property
    def visible(self) -> torch.Tensor | None:
        """``(n, T)`` bool visibility (built on first use; the streamed pass builds it per tile)."""
        if self._visible is None and self.is_causal:
            self._visible = visibility(self.query_positions, self.key_positions, self.gap)
        return self._visible

    @property
    def targets(self) -> StreamedTargets:
        """The streamed statistics with the whole block softmax ``probs (H, n, T)`` kept (built once)."""
        if self._targets is None:
            self._targets = self._stream((), None, keep_probs=True)
        return self._targets

    def scores(self, reductions, weights: torch.Tensor | None = None) -> dict:
        """``{reduction: (H, T)}`` scores over reference queries (see :func:`.scoring.reduce_scores`).

        From the full targets when a method already built them; otherwise one streamed pass over query
        tiles, which also keeps the fit's per-query statistics (a second call with other reductions or
        weights streams again).
        """
        reductions = tuple(reductions)
        if self._targets is not None:
            return {r: reduce_scores(self._targets.probs, r, weights) for r in reductions}
        st = self._stream(reductions, weights)
        return {r: st.scores[r] for r in reductions}

    @property
    def fit_stats(self) -> StreamedTargets:
        """rowmax / log-mass / validity of every query and outputs of :attr:`fit_rows` (streamed once)."""
        if self._streamed is None:
            self._stream((), None)
        return self._streamed

    def _stream(self, reductions, weights, keep_probs: bool = False) -> StreamedTargets:
        causal = self.is_causal
        st = stream_targets(self.keys, self.values, self.queries, self.scale, self.bias,
                            self.query_positions if causal else None, self.key_positions if causal else None,
                            self.gap, reductions, weights, self.fit_rows, self.query_tile, keep_probs)
        if self._streamed is None or not self._streamed.scores:
            self._streamed = st
        return st


class Method:
    """A compaction method: ``select`` returns kept indices ``(H,t)`` sorted by position.

    ``fits`` says whether β and values are fitted (Attention Matching) or copied (eviction baselines).
    """

    name = "base"
    fits = False

    def select(self, inp: CompactionInputs) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class CompactionResult:
    """Compacted block: ``keys (H,t,d)``, ``beta (H,t)`` fp32, ``values (H,t,d)``, ``indices (H,t)`` long.

    ``fit_error`` is the mean held-out relative attention-output error (NaN when not evaluated);
    ``heldout_output_error`` / ``heldout_mass_error`` are per head; ``plain_*`` the same for the plain
    kept entries (what eviction at these indices would give); ``gate`` per head 0 = plain, 1 = β only,
    2 = β + fitted values.
    """

    keys: torch.Tensor
    beta: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    method: str = "highest_attention"
    fit_error: float = float("nan")
    heldout_output_error: torch.Tensor | None = None
    heldout_mass_error: torch.Tensor | None = None
    plain_output_error: torch.Tensor | None = None
    plain_mass_error: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # seconds per component, see :data:`TIMED_COMPONENTS`

    @property
    def target(self) -> int:
        return int(self.keys.shape[1])


# Distant-causal targets (see targets.visibility): measured on the bundled model, gap 32–64 turned the
# fitted β/values from worse than eviction (continuation attention error 0.62 vs 0.38) into better (0.27).
DEFAULT_QUERY_GAP = 32
# Reference queries kept per KV head (random, seeded). 1024 vs 2048 vs 4096 changed the continuation
# attention error by < 2 % at ratio 0.1; cost is linear in it.
DEFAULT_MAX_QUERIES = 2048

_GENERAL = {"bias", "query_positions", "key_positions", "scale", "max_queries", "seed", "causal", "evaluate",
            "query_gap", "query_tile", "key_scores"}

#: What ``CompactionResult.timings`` reports (seconds): query subsampling and positions (``queries``),
#: the streamed scores and key selection (``scoring``), the β fit (``beta``), the value fit (``values``)
#: and the held-out gate with the result tensors (``gate``).
TIMED_COMPONENTS = ("queries", "scoring", "beta", "values", "gate")


def _split_options(method_cls: type, options: dict):
    method_fields = {f.name for f in dataclasses.fields(method_cls)} if dataclasses.is_dataclass(method_cls) else set()
    fit_fields = {f.name for f in dataclasses.fields(FitConfig)}
    m_opts, f_opts, g_opts = {}, {}, {}
    for k, v in options.items():
        if k in method_fields:
            m_opts[k] = v
        elif k in fit_fields:
            f_opts[k] = v
        elif k in _GENERAL:
            g_opts[k] = v
        else:
            raise TypeError(f"unknown compaction option {k!r} for method {method_cls.name!r}")
    return m_opts, f_opts, g_opts


def sum_timings(parts) -> dict:
    """Per-component seconds of several results added up (chunked and per-head compaction)."""
    out: dict[str, float] = {}
    for part in parts:
        for name, seconds in part.timings.items():
            out[name] = out.get(name, 0.0) + seconds
    return out


def _positions(p, device) -> torch.Tensor | None:
    """Positions as a flat long tensor on ``device``: callers build them wherever is convenient (the
    engine on the CPU with ``torch.arange``, next to device-resident queries and keys)."""
    if p is None:
        return None
    return torch.as_tensor(p).reshape(-1).to(device=device, dtype=torch.long)


def _subsample(queries, query_positions, max_queries, generator):
    """At most ``max_queries`` rows, chosen by the (CPU) generator so the choice is the same on every
    device; positions are indexed on their own device."""
    n = queries.shape[1]
    if max_queries is None or n <= max_queries:
        return queries, query_positions
    keep = torch.randperm(n, generator=generator)[:max_queries].sort().values
    qp = query_positions[keep.to(query_positions.device)] if query_positions is not None else None
    return queries[:, keep.to(queries.device)], qp


def _in_position_order(queries, query_positions):
    """Reference queries sorted by position (stable). Every result is a sum over queries, so the order
    changes nothing but rounding; in order, each query tile of the streamed pass is a slice of rows (GQA
    pooling lays the query heads out one after the other, so positions arrive as G ascending runs)."""
    if query_positions is None or query_positions.numel() < 2:
        return queries, query_positions
    if bool((query_positions[1:] >= query_positions[:-1]).all()):
        return queries, query_positions
    order = torch.argsort(query_positions, stable=True)
    return queries[:, order.to(queries.device)], query_positions[order]


class _Clock:
    """Per-component wall time; on CUDA it synchronises at each mark so the time lands where it is spent."""

    def __init__(self, device: torch.device):
        self._sync = torch.cuda.synchronize if device.type == "cuda" else None
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        if self._sync is not None:
            self._sync()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._last
        self._last = now


def compact(keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, target: int,
            method: str = "highest_attention", **options) -> CompactionResult:
    """Compact one block of ``T`` cached entries per KV head into ``target`` entries.

    Parameters
    ----------
    keys, values : ``(H_kv, T, d)`` post-RoPE, any float dtype (computed in fp32).
    queries : ``(H_kv, n, d)`` reference queries, the G query heads of each KV head pooled into n rows.
    target : kept entries per head.
    method : one of :data:`METHODS`.
    bias : optional ``(H_kv, T)`` β of an already-compacted cache; used in the targets and kept in the
        stored β (β-aware re-compaction).
    query_positions, key_positions : optional ``(n,)`` / ``(T,)`` integer positions on any device (the
        engine builds them on the CPU); with both, targets are causal (a query only sees keys at or
        before its own position). ``causal=False`` disables it.
    scale : logit scale, default ``1/sqrt(d)``.
    query_gap : with causal targets, a query also ignores its ``query_gap`` nearest keys (default 32;
        "distant-causal" targets, see :func:`.targets.visibility`).
    max_queries : cap on reference queries per head (random subset, seeded); default 2048.
    seed : seeds subsampling, the held-out split and ``random``.
    query_tile : reference queries per tile of the streamed scoring pass (bounds its work memory).
    key_scores : optional ``(H_kv, T)`` key importance computed outside (e.g. :func:`.kvzip.reconstruction_scores`
        over the whole repeat-prefill context); score-based methods select by it instead of their own
        reductions over ``queries``, which then only serve the fit.
    Other keyword options are fields of the method's dataclass or of :class:`FitConfig`.
    """
    t0 = time.perf_counter()
    if method not in REGISTRY:
        raise ValueError(f"unknown compaction method {method!r}; expected one of {tuple(REGISTRY)}")
    cls = REGISTRY[method]
    m_opts, f_opts, g_opts = _split_options(cls, options)
    H, T, d = keys.shape
    if values.shape[:2] != (H, T) or queries.shape[0] != H or queries.shape[-1] != d:
        raise ValueError(f"shape mismatch: keys {tuple(keys.shape)}, values {tuple(values.shape)}, "
                         f"queries {tuple(queries.shape)}")
    target = int(target)
    if target < 1:
        raise ValueError("target must be ≥ 1")
    device = keys.device
    bias = g_opts.get("bias")
    bias = bias.to(device=device, dtype=torch.float32) if bias is not None else None
    gen = torch.Generator().manual_seed(int(g_opts.get("seed", 0)))
    if target >= T:
        # Nothing to remove: exact reproduction (values and β untouched).
        beta = bias.clone() if bias is not None else torch.zeros(H, T, device=device)
        idx = torch.arange(T, device=device).expand(H, T).clone()
        return CompactionResult(keys.clone(), beta, values.clone(), idx, method=method, fit_error=0.0,
                                seconds=time.perf_counter() - t0)
    clock = _Clock(device)
    scale = g_opts.get("scale") or 1.0 / math.sqrt(d)
    qpos = _positions(g_opts.get("query_positions"), device)
    kpos = _positions(g_opts.get("key_positions"), device)
    meth = cls(**m_opts)
    # A method may declare its own defaults (eviction baselines: all queries, no gap); explicit options win.
    max_queries = g_opts.get("max_queries", getattr(meth, "max_queries", DEFAULT_MAX_QUERIES))
    gap = int(g_opts.get("query_gap", getattr(meth, "query_gap", DEFAULT_QUERY_GAP)))
    q, qpos = _in_position_order(*_subsample(queries.to(device), qpos, max_queries, gen))
    n = q.shape[1]
    evaluate = g_opts.get("evaluate", meth.fits)
    cfg = FitConfig(**f_opts)
    used = None
    if (meth.fits or evaluate) and cfg.fit_from > 0 and qpos is not None and n:
        pf = qpos.float()
        used = pf >= torch.quantile(pf, cfg.fit_from)
    inp = CompactionInputs(keys.float(), values.float(), q.float(), target, float(scale), bias, qpos, kpos, gen,
                           gap=gap, causal=g_opts.get("causal", True),
                           query_tile=int(g_opts.get("query_tile", DEFAULT_QUERY_TILE)),
                           fit_rows=used.nonzero().squeeze(-1) if used is not None else None,
                           key_scores=(g_opts["key_scores"].to(device=device, dtype=torch.float32)
                                       if g_opts.get("key_scores") is not None else None))
    clock.mark("queries")
    idx = meth.select(inp).to(device=device, dtype=torch.long)
    idx = torch.sort(idx, dim=-1).values
    C1 = torch.gather(inp.keys, 1, idx.unsqueeze(-1).expand(H, target, d))
    clock.mark("scoring")
    if meth.fits or evaluate:
        if not meth.fits:
            cfg = dataclasses.replace(cfg, fit_beta=False, fit_values=False, gate=False)
        st = inp.fit_stats
        rows = st.rows
        held = heldout_split(rows.numel(), cfg.heldout_fraction, gen, device,
                             qpos[rows] if qpos is not None else None, cfg.heldout)
        # The kept keys' logits on the fit's rows only (t ≪ T columns, m ≤ n rows).
        q_fit = inp.queries[:, rows]
        vis_k = None
        if inp.is_causal:
            vis_k = kpos[idx].unsqueeze(1) <= qpos[rows].view(1, -1, 1) - inp.gap  # (H,m,t)
        bias_k = torch.gather(bias, 1, idx) if bias is not None else None
        s_k = logits(q_fit, C1, inp.scale, bias_k, vis_k)
        fit_targets = FitTargets(s_k, st.rowmax[:, rows], st.log_mass[:, rows], st.output, st.valid[:, rows])
        fr: FitResult = fit_block(fit_targets, inp.values, idx, bias, cfg, held, clock=clock)
        beta, C2 = fr.beta, fr.values
        res = CompactionResult(C1.to(keys.dtype), beta, C2.to(values.dtype), idx, method=method,
                               fit_error=float(fr.heldout_output_error.mean()),
                               heldout_output_error=fr.heldout_output_error, heldout_mass_error=fr.heldout_mass_error,
                               plain_output_error=fr.plain_output_error, plain_mass_error=fr.plain_mass_error,
                               gate=fr.choice, info=fr.info)
        res.info["peak_work_bytes"] = st.peak_work_bytes
    else:
        beta = torch.gather(inp.bias, 1, idx) if inp.bias is not None else torch.zeros(H, target, device=device)
        C2 = torch.gather(inp.values, 1, idx.unsqueeze(-1).expand(H, target, d))
        res = CompactionResult(C1.to(keys.dtype), beta.float(), C2.to(values.dtype), idx, method=method)
    clock.mark("gate")
    res.timings = clock.times
    res.seconds = time.perf_counter() - t0
    return res
