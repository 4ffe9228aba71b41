"""Runs one compaction job on a worker: per layer, gather → Attention Matching → write back.

The KV layout is abstracted by :class:`PagedKV` (the CPU and CUDA runners provide one), so this module
only knows the job's geometry and the algorithm's API. Any exception or non-finite result fails the job;
the scheduler then frees the destination blocks and serves the request uncompacted.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from vllm_attnmatch.algorithms import compact, compact_chunked, compact_per_head, group_queries
from vllm_attnmatch.contract.jobs import CompactionJob, CompactionResult

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")

#: Debugging and parity tests: when set, every compacted layout is saved as <dir>/<req_id>.pt.
DUMP_DIR_ENV = "VLLM_ATTNMATCH_DUMP_DIR"


class PagedKV(Protocol):
    """What the executor needs from a paged KV layout (one instance per runner)."""

    def layer_names(self) -> list[str]: ...

    def gather(self, layer: str, block_ids, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of the first ``length`` slots: each ``(H_kv, length, d)``."""

    def write(self, layer: str, block_ids, keys: torch.Tensor, values: torch.Tensor, beta: torch.Tensor) -> None:
        """Write ``(H_kv, L, d)`` keys/values and ``(H_kv, L)`` β into the first L slots of the blocks;
        the remaining slots of the blocks get β = 0 (they will hold future tokens)."""

    def gather_bias(self, layer: str, block_ids, length: int) -> torch.Tensor:
        """β of the first ``length`` slots: ``(H_kv, length)`` fp32."""

    def scale(self, layer: str) -> float: ...


class LayerPagedKV:
    """Common part of the layout adapters: the model's attention layers and the β side tensors."""

    def __init__(self, forward_context: dict, layer_names: list[str], bias: dict[str, torch.Tensor]):
        self._layers = {name: forward_context[name] for name in layer_names}
        self._bias = bias

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def scale(self, layer: str) -> float:
        return float(self._layers[layer].impl.scale)

    def gather_bias(self, layer: str, block_ids, length: int) -> torch.Tensor:
        bias = self._bias[layer]  # (num_blocks, H_kv, block_size) in both layouts
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=bias.device)
        return bias[ids].permute(1, 0, 2).reshape(bias.shape[1], -1)[:, :length]


class NonFiniteCompaction(RuntimeError):
    pass


def _inject(fault: str | None, result) -> None:
    """Test-only faults (the scheduler sets ``job.fault`` only when fault injection is enabled)."""
    if fault == "solver":
        raise RuntimeError("injected solver error")
    if fault == "oom":
        raise torch.OutOfMemoryError("injected out of memory while compacting")
    if fault == "nonfinite":
        result.values[..., 0] = float("nan")


def _compact_span(job: CompactionJob, span_k, span_v, pooled, span_bias, kwargs, layer_index: int | None = None):
    target = job.layout.target
    if job.head_targets is not None and layer_index is not None:
        return compact_per_head(span_k, span_v, pooled, job.head_targets[layer_index], job.method, bias=span_bias, **kwargs)
    if job.chunk_tokens:
        return compact_chunked(span_k, span_v, pooled, target, job.chunk_tokens, job.method, bias=span_bias, **kwargs)
    return compact(span_k, span_v, pooled, target, method=job.method, bias=span_bias, **kwargs)


def compact_layer_online(
    job: CompactionJob,
    keys: torch.Tensor,
    values: torch.Tensor,
    beta: torch.Tensor,
    queries: torch.Tensor | None,
    scale: float,
    timings: dict | None = None,
):
    """Re-compact a physical cache at its ceiling: the span may hold entries compacted before (their β
    enters the targets and the result) and −inf padding (dropped). Every captured query comes after the
    span's entries or is a decode query that saw all of them, so the targets are not causal."""
    layout = job.layout
    first, end = layout.keep_first, layout.span_end
    beta = beta.to(device=keys.device, dtype=torch.float32)
    real = torch.isfinite(beta[:, first:end]).all(0)
    span_k, span_v, span_b = keys[:, first:end][:, real], values[:, first:end][:, real], beta[:, first:end][:, real]
    kwargs = dict(job.options)
    kwargs["scale"] = scale
    kwargs.pop("query_gap", None)
    if queries is not None and queries.shape[0]:
        pooled, _ = group_queries(queries.to(device=keys.device, dtype=torch.float32), keys.shape[0])
    else:
        pooled = torch.zeros((keys.shape[0], 0, keys.shape[2]), device=keys.device)
    result = _compact_span(job, span_k, span_v, pooled, span_b, kwargs)
    _inject(job.fault, result)
    _check_finite(result)
    _add_timings(timings, result)
    # Fewer real entries than the target: pad (β = -inf) to the layout.
    return _splice(keys, values, beta, result, first, end, layout.target - result.target)


def _add_timings(timings: dict | None, result) -> None:
    """Accumulate the algorithm's per-component seconds (``CompactionResult.timings``) into ``timings``."""
    if timings is None:
        return
    for name, seconds in getattr(result, "timings", {}).items():
        timings[name] = timings.get(name, 0.0) + seconds


def _splice(keys, values, beta, result, first: int, end: int, pad: int):
    """The new layout: ``[0, first)`` as it was, the compacted span, ``pad`` empty slots (β = -inf), then
    ``[end, …)`` as it was; with the result's fit error."""
    num_heads, _, head_dim = keys.shape
    empty = keys.new_zeros((num_heads, pad, head_dim))
    new_keys = torch.cat([keys[:, :first], result.keys.to(keys.dtype), empty, keys[:, end:]], dim=1)
    new_values = torch.cat([values[:, :first], result.values.to(values.dtype), empty, values[:, end:]], dim=1)
    padding = torch.full((num_heads, pad), float("-inf"), device=beta.device)
    new_beta = torch.cat([beta[:, :first], result.beta.float().to(beta.device), padding, beta[:, end:]], dim=1)
    return new_keys, new_values, new_beta, float(getattr(result, "fit_error", math.nan))


def _check_finite(result) -> None:
    for name in ("keys", "values", "beta"):
        if not torch.isfinite(getattr(result, name)).all():
            raise NonFiniteCompaction(f"non-finite {name} in the compacted cache")


def compact_layer(
    job: CompactionJob,
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor | None,
    query_positions: torch.Tensor | None,
    scale: float,
    extra_queries: torch.Tensor | None = None,
    extra_positions: torch.Tensor | None = None,
    layer_index: int | None = None,
    timings: dict | None = None,
    key_scores: torch.Tensor | None = None,
):
    """Compact one layer's span; return the full new layout (keys, values, β) and the fit error.

    ``key_scores`` ``(H_kv, ≥ span end)``: key importance a query source computed over the whole prefix
    (the ``repeat`` source's reconstruction score); the span's part selects the keys.

    Device and dtype as the runner hands them over: keys/values in the model dtype on the device, queries
    on the device (any float dtype), positions on the CPU (the step's ``torch.arange``). Queries are moved
    to the keys' device in fp32; positions stay where they are and :func:`compact` places them. ``timings``
    (optional) accumulates the algorithm's per-component seconds.
    """
    layout = job.layout
    first, end = layout.keep_first, layout.span_end
    span_k, span_v = keys[:, first:end], values[:, first:end]
    kwargs = dict(job.options)
    kwargs["scale"] = scale
    device = keys.device
    if key_scores is not None:
        kwargs["key_scores"] = key_scores[:, first:end].to(device)
    if queries is not None:
        queries = queries.to(device=device, dtype=torch.float32)
    if queries is not None and query_positions is not None:
        # Rows before the span see none of its keys under causal targets: they carry no information.
        # Rows after it would make the compacted prefix depend on the request's suffix, and a shared
        # compacted prefix must depend on the prefix alone.
        query_positions = query_positions.reshape(-1).long()
        sees_span = (query_positions >= first) & (query_positions < end)
        queries, query_positions = queries[sees_span.to(device)], query_positions[sees_span]
    if extra_queries is not None:
        # Synthetic queries (repeat / self_study) come after the span and depend on the prefix alone.
        extra_queries = extra_queries.to(device=device, dtype=torch.float32)
        if extra_positions is not None:
            extra_positions = extra_positions.reshape(-1).long()
        if queries is None:
            queries, query_positions = extra_queries, extra_positions
        else:
            # Positions are kept only if every row has one (else the targets are not causal).
            known = query_positions is not None and extra_positions is not None
            queries = torch.cat([queries, extra_queries])
            query_positions = torch.cat([query_positions, extra_positions.to(query_positions.device)]) if known else None
    if queries is not None and query_positions is not None:
        pooled, kwargs["query_positions"] = group_queries(queries, keys.shape[0], query_positions)
        kwargs["key_positions"] = torch.arange(first, end)
    elif queries is not None:
        pooled, _ = group_queries(queries, keys.shape[0])
    else:
        pooled = torch.zeros((keys.shape[0], 0, keys.shape[2]), device=device)
    result = _compact_span(job, span_k, span_v, pooled, None, kwargs, layer_index)
    _inject(job.fault, result)
    _check_finite(result)
    _add_timings(timings, result)
    # A prefill compaction's source is raw (β = 0). Non-uniform heads: this layer's largest head may be
    # below the layout's target; the rest of the last compacted block is padding too.
    raw_beta = torch.zeros(keys.shape[:2], device=keys.device)
    return _splice(keys, values, raw_beta, result, first, end, layout.target - result.target + layout.pad)


def layer_index(name: str) -> int:
    """``model.layers.12.self_attn.attn`` -> 12 (the order of per-layer settings such as head budgets)."""
    match = _LAYER_INDEX.search(name)
    if match is None:
        raise ValueError(f"cannot tell the layer index of attention layer {name!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class SourceCost:
    """What a synthetic reference-query source cost (``worker/synthetic``'s ``ExtraQueries`` or
    ``OnPolicyLayers``): all its seconds, the part that produced reference queries, and by component.
    Numbers only, so a released job keeps none of the source's tensors."""

    seconds: float
    query_seconds: float
    components: dict

    @classmethod
    def of(cls, source) -> SourceCost | None:
        return None if source is None else cls(source.seconds, source.query_seconds, dict(source.components))


class _LayerClock:
    """Laps of one layer's work into ``totals``; the algorithm's own components arrive in :attr:`inner`
    and are taken out of the lap they happened in (so ``prepare`` is only the executor's share)."""

    def __init__(self, totals: dict[str, float]) -> None:
        self.totals, self.inner = totals, {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # the time lands where it is spent
            torch.cuda.synchronize()
        now = time.perf_counter()
        inner = sum(self.inner.values())
        for key, seconds in self.inner.items():
            self.totals[key] = self.totals.get(key, 0.0) + seconds
        self.totals[name] = self.totals.get(name, 0.0) + max(0.0, now - self._last - inner)
        self.inner, self._last = {}, now


class JobRun:
    """One job on one worker, run a slice of layers at a time (``run_layers``), so that a compaction
    spreads over several engine steps and never freezes the batch (the scheduler holds the request out
    of scheduling meanwhile; its source blocks stay valid until the job is booked).

    The first failure is kept and later slices do nothing; the result is reported only when the last
    layer's slice has run, so every rank ends a job on the same step whatever happened to it.
    """

    def __init__(self, job: CompactionJob, kv: PagedKV, queries, query_positions, extra=None, compacted=None) -> None:
        self.job = job
        self.kv = kv
        self.queries = queries
        self.query_positions = query_positions
        self.extra = extra
        # On-policy jobs arrive compacted (worker/synthetic.OnPolicyLayers): their slices only write.
        self.compacted = compacted
        # What the synthetic source cost before the first slice, added to the result when the job ends.
        self.source_cost = SourceCost.of(extra if extra is not None else compacted)
        self.query_source = "context"
        self.seconds = 0.0
        # Seconds per component over the job's layers: ``gather`` (reading the paged source), the
        # algorithm's own components (see ``algorithms.base.TIMED_COMPONENTS``), ``prepare`` (the rest of
        # the executor's work around it) and ``write`` (the new layout into the destination blocks).
        self.timings: dict[str, float] = {}
        self.error = ""
        self._layers = kv.layer_names()
        self._next = 0
        self._errors: list[float] = []
        self._dump_dir = os.environ.get(DUMP_DIR_ENV)
        self._dump: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def done(self) -> bool:
        return self._next >= len(self._layers)

    def run_layers(self, count: int) -> None:
        """Compact the next ``count`` layers into the destination blocks (fewer at the end)."""
        end = min(len(self._layers), self._next + max(0, count))
        while self._next < end:
            layer = self._layers[self._next]
            self._next += 1  # a failed job still counts its layers: it ends on the same step everywhere
            if self.error:
                continue
            started = time.perf_counter()
            try:
                compacted = self._run_layer(layer)
            except Exception as exc:  # noqa: BLE001 - any failure serves the request uncompacted
                self.error = f"{type(exc).__name__}: {exc}"
                self.release()
                continue
            finally:
                self.seconds += time.perf_counter() - started
            if self._dump_dir:  # debug dumps for the tests' reference forward: outside the timed work
                self._dump[layer] = {name: tensor.cpu() for name, tensor in compacted.items()}
                if self.done:
                    torch.save({"layout": self.job.layout, "layers": self._dump},
                               os.path.join(self._dump_dir, f"{self.job.req_id}.pt"))

    def _run_layer(self, layer: str) -> dict[str, torch.Tensor]:
        """Compact one layer into the destination blocks; returns what was written."""
        job, kv, layout, extra = self.job, self.kv, self.job.layout, self.extra
        clock = _LayerClock(self.timings)
        if self.compacted is not None:
            new_keys, new_values, beta, fit_error = self.compacted.layers.pop(layer)
            return self._write(layer, clock, new_keys, new_values, beta, fit_error)
        keys, values = kv.gather(layer, job.src_block_ids, layout.num_tokens)
        clock.lap("gather")
        # Captured in the model's dtype to keep them small; the fit works in fp32, one layer at a time.
        queries = self.queries.get(layer)
        queries = queries.float() if queries is not None else None
        if layout.online:
            old_beta = kv.gather_bias(layer, job.src_block_ids, layout.num_tokens).to(keys.device)
            new_keys, new_values, beta, fit_error = compact_layer_online(
                job, keys, values, old_beta, queries, kv.scale(layer), timings=clock.inner
            )
        else:
            # A synthetic source's queries (and key scores) for this layer; a layered source makes them now.
            extra_queries, key_scores = None, None
            if extra is not None:
                extra_queries, key_scores = extra.layer(layer)
                clock.lap("reference_queries")
            new_keys, new_values, beta, fit_error = compact_layer(
                job,
                keys,
                values,
                queries,
                self.query_positions,
                kv.scale(layer),
                extra_queries,
                extra.positions if extra is not None else None,
                layer_index(layer) if job.head_targets is not None else None,
                timings=clock.inner,
                key_scores=key_scores,
            )
        clock.lap("prepare")
        return self._write(layer, clock, new_keys, new_values, beta, fit_error)

    def _write(self, layer: str, clock: _LayerClock, new_keys, new_values, beta, fit_error) -> dict[str, torch.Tensor]:
        self.kv.write(layer, self.job.dst_block_ids, new_keys, new_values, beta)
        clock.lap("write")
        self._errors.append(fit_error)
        # This layer's reference queries are spent: free them now rather than at the end of the job.
        if isinstance(self.queries, dict) and not self.job.layout.online:
            self.queries.pop(layer, None)
        return {"keys": new_keys, "values": new_values, "beta": beta}

    def release(self) -> None:
        """Drop the captured queries (a failed or cancelled job keeps nothing alive)."""
        self.queries, self.query_positions, self.extra, self.compacted, self._dump = {}, None, None, None, {}

    def result(self) -> CompactionResult:
        layout = self.job.layout
        failed = bool(self.error) or not self.done
        finite = [e for e in self._errors if math.isfinite(e)]
        return CompactionResult(
            req_id=self.job.req_id,
            ok=not failed,
            seconds=self.seconds,
            tokens_before=layout.num_tokens,
            tokens_after=layout.num_tokens if failed else layout.physical_len,
            fit_error=sum(finite) / len(finite) if finite and not failed else math.nan,
            error=(self.error or "the job did not run every layer") if failed else "",
            timings={} if failed else dict(self.timings),
            job_id=self.job.job_id,
        )


def run_job(
    job: CompactionJob,
    kv: PagedKV,
    queries: dict[str, torch.Tensor],
    query_positions: torch.Tensor | None,
    extra=None,
) -> CompactionResult:
    """Compact every layer of one request into its destination blocks, in one go."""
    run = JobRun(job, kv, queries, query_positions, extra)
    run.run_layers(len(kv.layer_names()))
    return run.result()
