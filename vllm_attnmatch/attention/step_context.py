"""Per-step state shared by the model runner (which fills it) and the attention impls (which read it).

One object per runner, attached to every attention impl of the model, so no module globals: the runner
says which batch rows belong to requests whose queries must be captured and which requests are
compacted (their attention adds β); the impls append captured queries here. No vLLM import.

Captured queries are memory outside vLLM's KV budget, so they are kept small: only every ``stride``-th
prefill row is captured (at most ``max_query_tokens`` rows per request), in the model's dtype (the fit
upcasts one layer at a time), and they are dropped as soon as the job takes them, or when the request is
skipped, preempted, aborted or finishes. Capture runs inside the attention forward, where an allocation
failure would kill the step: an out-of-memory there drops that request's capture instead and its
compaction fails cleanly (served uncompacted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_attnmatch.oom import is_out_of_memory


@dataclass(frozen=True)
class CaptureRows:
    """Rows ``[start, end)`` of this step's query tensor belong to the request; their logical
    positions start at ``first_position``; keep the rows whose position is a multiple of ``stride``."""

    start: int
    end: int
    first_position: int
    stride: int

    def selected(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row indices into the step's query tensor, logical positions) of the kept rows."""
        positions = torch.arange(self.first_position, self.first_position + self.end - self.start)
        keep = positions % self.stride == 0
        return torch.arange(self.start, self.end)[keep], positions[keep]


@dataclass
class StepContext:
    # req_id -> rows to capture in this step
    capture: dict[str, CaptureRows] = field(default_factory=dict)
    # batch indices (rows of the attention metadata) of compacted requests: attention adds β for them
    biased_batch_rows: list[int] = field(default_factory=list)
    # the same as tensors for batched kernels: rows, their token indices, their cu_seqlens (CPU)
    biased_rows_tensor: torch.Tensor | None = None
    biased_token_index: torch.Tensor | None = None
    biased_cu_seqlens: torch.Tensor | None = None
    biased_max_query_len: int = 0
    # layer name -> β side tensor of that layer (layout chosen by the runner's KV layout)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    # req_id -> layer name -> list of captured query chunks (n_i, H_q, d)
    captured_queries: dict[str, dict[str, list[torch.Tensor]]] = field(default_factory=dict)
    # req_id -> list of logical positions of the captured rows (same for every layer)
    captured_positions: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    # req_id -> number of captured rows (kept in step with captured_positions)
    captured_rows: dict[str, int] = field(default_factory=dict)
    # req_id -> why its capture was dropped (its compaction fails instead of running on partial queries)
    capture_failed: dict[str, str] = field(default_factory=dict)
    # what a backend derived from this step's metadata once, for all its layers (cleared every step)
    per_step: dict[str, object] = field(default_factory=dict)

    def record_queries(self, layer_name: str, query: torch.Tensor) -> None:
        """Called by each attention layer with the step's post-RoPE queries (num_tokens, H_q, d)."""
        for req_id, rows in self.capture.items():
            if req_id in self.capture_failed:
                continue
            index, _ = rows.selected()
            if index.numel() == 0:
                continue
            try:
                kept = query[index.to(query.device)].detach().clone()  # model dtype; index_select copies
            except Exception as exc:  # noqa: BLE001 - only running out of memory is absorbed
                if not is_out_of_memory(exc):
                    raise
                self.forget([req_id])
                self.capture_failed[req_id] = "out of memory while capturing reference queries"
                continue
            self.captured_queries.setdefault(req_id, {}).setdefault(layer_name, []).append(kept)

    def begin_step(
        self, capture: dict[str, CaptureRows], biased_batch_rows: list[int], query_starts: list[int] | None = None
    ) -> None:
        self.capture = capture
        self.biased_batch_rows = biased_batch_rows
        self.per_step = {}
        if biased_batch_rows and query_starts is not None:
            spans = [(query_starts[r], query_starts[r + 1]) for r in biased_batch_rows]
            lengths = [end - start for start, end in spans]
            self.biased_rows_tensor = torch.tensor(biased_batch_rows, dtype=torch.long)
            self.biased_token_index = torch.cat([torch.arange(s, e) for s, e in spans])
            self.biased_cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.biased_max_query_len = max(lengths)
        for req_id, rows in capture.items():
            if req_id in self.capture_failed:
                continue
            _, positions = rows.selected()
            if positions.numel():
                self.captured_positions.setdefault(req_id, []).append(positions)
                self.captured_rows[req_id] = self.captured_rows.get(req_id, 0) + positions.numel()

    def take_queries(self, req_id: str, keep: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """A request's captured queries: layer -> (n, H_q, d), and their positions (n,). Popped unless
        ``keep`` (an online request compacts repeatedly from the same ring of queries). Raises if the
        request's capture was dropped (out of memory)."""
        failed = self.capture_failed.get(req_id)
        if failed is not None:
            if not keep:
                self.capture_failed.pop(req_id, None)
            raise RuntimeError(failed)
        per_layer = self.captured_queries.get(req_id, {}) if keep else self.captured_queries.pop(req_id, {})
        positions = self.captured_positions.get(req_id, []) if keep else self.captured_positions.pop(req_id, [])
        if not keep:
            self.captured_rows.pop(req_id, None)
        queries = {name: torch.cat(chunks) for name, chunks in per_layer.items()}
        return queries, (torch.cat(positions) if positions else None)

    def trim(self, limits: dict[str, int]) -> None:
        """Bound each listed request's ring of captured rows: once it holds twice ``limits[req_id]``,
        keep the newest ``limit`` (amortised: a decode step appends one row and must stay cheap)."""
        for req_id, limit in limits.items():
            if self.captured_rows.get(req_id, 0) <= 2 * limit:
                continue
            kept = torch.cat(self.captured_positions[req_id])[-limit:]
            self.captured_positions[req_id] = [kept]
            self.captured_rows[req_id] = kept.numel()
            per_layer = self.captured_queries.get(req_id, {})
            for name, chunks in per_layer.items():
                per_layer[name] = [torch.cat(chunks)[-limit:]]

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self.captured_queries.pop(req_id, None)
            self.captured_positions.pop(req_id, None)
            self.captured_rows.pop(req_id, None)
            self.capture_failed.pop(req_id, None)

    def captured_bytes(self) -> int:
        """Memory held by captured queries (reported by the memory benchmark)."""
        return sum(t.numel() * t.element_size() for layers in self.captured_queries.values()
                   for chunks in layers.values() for t in chunks)
