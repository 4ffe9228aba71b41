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
from typing import Protocol

import torch

from vllm_attnmatch.algorithms import compact, compact_chunked, compact_per_head, group_queries
from vllm_attnmatch.engine.jobs import CompactionJob, CompactionResult

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
):
    """Re-compact a physical cache at its ceiling: the span may hold entries compacted before (their β
    enters the targets and the result) and −inf padding (dropped). Every captured query comes after the
    span's entries or is a decode query that saw all of them, so the targets are not causal."""
    layout = job.layout
    first, end = layout.keep_first, layout.span_end
    real = torch.isfinite(beta[:, first:end]).all(0)
    span_k, span_v, span_b = keys[:, first:end][:, real], values[:, first:end][:, real], beta[:, first:end][:, real]
    kwargs = dict(job.options)
    kwargs["scale"] = scale
    kwargs.pop("query_gap", None)
    if queries is not None and queries.shape[0]:
        pooled, _ = group_queries(queries, keys.shape[0])
    else:
        pooled = span_k.new_zeros((keys.shape[0], 0, keys.shape[2]))
    result = _compact_span(job, span_k, span_v, pooled.to(span_k.device), span_b, kwargs)
    _inject(job.fault, result)
    _check_finite(result)
    # Fewer real entries than the target: pad (β = -inf) to the layout.
    return _splice(keys, values, beta, result, first, end, layout.target - result.target)


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
):
    """Compact one layer's span; return the full new layout (keys, values, β) and the fit error."""
    layout = job.layout
    first, end = layout.keep_first, layout.span_end
    span_k, span_v = keys[:, first:end], values[:, first:end]
    kwargs = dict(job.options)
    kwargs["scale"] = scale
    if queries is not None and query_positions is not None:
        # Rows before the span see none of its keys under causal targets: they carry no information.
        # Rows after it would make the compacted prefix depend on the request's suffix, and a shared
        # compacted prefix must depend on the prefix alone.
        sees_span = (query_positions >= first) & (query_positions < end)
        queries, query_positions = queries[sees_span], query_positions[sees_span]
    if extra_queries is not None:
        # Synthetic queries (repeat / self_study) come after the span and depend on the prefix alone.
        queries = extra_queries if queries is None else torch.cat([queries, extra_queries.to(queries)])
        query_positions = (
            extra_positions if query_positions is None else torch.cat([query_positions, extra_positions])
        )
    if queries is not None and query_positions is not None:
        pooled, kwargs["query_positions"] = group_queries(queries, keys.shape[0], query_positions)
        kwargs["key_positions"] = torch.arange(first, end)
    else:
        pooled = span_k.new_zeros((keys.shape[0], 0, keys.shape[2]))
    result = _compact_span(job, span_k, span_v, pooled, None, kwargs, layer_index)
    _inject(job.fault, result)
    _check_finite(result)
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


def run_job(
    job: CompactionJob,
    kv: PagedKV,
    queries: dict[str, torch.Tensor],
    query_positions: torch.Tensor | None,
    extra=None,
) -> CompactionResult:
    """Compact every layer of one request into its destination blocks."""
    started = time.perf_counter()
    layout = job.layout
    errors: list[float] = []
    dump_dir = os.environ.get(DUMP_DIR_ENV)
    dump: dict[str, dict[str, torch.Tensor]] = {}
    try:
        for layer in kv.layer_names():
            keys, values = kv.gather(layer, job.src_block_ids, layout.num_tokens)
            if layout.online:
                old_beta = kv.gather_bias(layer, job.src_block_ids, layout.num_tokens).to(keys.device)
                new_keys, new_values, beta, fit_error = compact_layer_online(
                    job, keys, values, old_beta, queries.get(layer), kv.scale(layer)
                )
            else:
                new_keys, new_values, beta, fit_error = compact_layer(
                    job,
                    keys,
                    values,
                    queries.get(layer),
                    query_positions,
                    kv.scale(layer),
                    extra.queries.get(layer) if extra is not None else None,
                    extra.positions if extra is not None else None,
                    layer_index(layer) if job.head_targets is not None else None,
                )
            kv.write(layer, job.dst_block_ids, new_keys, new_values, beta)
            errors.append(fit_error)
            if dump_dir:
                dump[layer] = {"keys": new_keys.cpu(), "values": new_values.cpu(), "beta": beta.cpu()}
        if dump_dir:
            torch.save({"layout": layout, "layers": dump}, os.path.join(dump_dir, f"{job.req_id}.pt"))
    except Exception as exc:  # noqa: BLE001 - any failure serves the request uncompacted
        return CompactionResult(
            req_id=job.req_id,
            ok=False,
            seconds=time.perf_counter() - started,
            tokens_before=layout.num_tokens,
            tokens_after=layout.num_tokens,
            error=f"{type(exc).__name__}: {exc}",
        )
    finite = [e for e in errors if math.isfinite(e)]
    return CompactionResult(
        req_id=job.req_id,
        ok=True,
        seconds=time.perf_counter() - started,
        tokens_before=layout.num_tokens,
        tokens_after=layout.physical_len,
        fit_error=sum(finite) / len(finite) if finite else math.nan,
    )
