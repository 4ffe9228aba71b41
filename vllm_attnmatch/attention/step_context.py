"""Per-step state shared by the model runner (which fills it) and the attention impls (which read it).

One object per runner, attached to every attention impl of the model, so no module globals: the runner
says which batch rows belong to requests whose queries must be captured and which requests are
compacted (their attention adds β); the impls append captured queries here. No vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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

    def record_queries(self, layer_name: str, query: torch.Tensor) -> None:
        """Called by each attention layer with the step's post-RoPE queries (num_tokens, H_q, d)."""
        for req_id, rows in self.capture.items():
            index, _ = rows.selected()
            if index.numel() == 0:
                continue
            per_layer = self.captured_queries.setdefault(req_id, {})
            per_layer.setdefault(layer_name, []).append(query[index].detach().float().clone())

    def begin_step(
        self, capture: dict[str, CaptureRows], biased_batch_rows: list[int], query_starts: list[int] | None = None
    ) -> None:
        self.capture = capture
        self.biased_batch_rows = biased_batch_rows
        if biased_batch_rows and query_starts is not None:
            spans = [(query_starts[r], query_starts[r + 1]) for r in biased_batch_rows]
            lengths = [end - start for start, end in spans]
            self.biased_rows_tensor = torch.tensor(biased_batch_rows, dtype=torch.long)
            self.biased_token_index = torch.cat([torch.arange(s, e) for s, e in spans])
            self.biased_cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
            self.biased_max_query_len = max(lengths)
        for req_id, rows in capture.items():
            _, positions = rows.selected()
            if positions.numel():
                self.captured_positions.setdefault(req_id, []).append(positions)

    def take_queries(self, req_id: str) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Pop a request's captured queries: layer -> (n, H_q, d), and their positions (n,)."""
        per_layer = self.captured_queries.pop(req_id, {})
        positions = self.captured_positions.pop(req_id, [])
        queries = {name: torch.cat(chunks) for name, chunks in per_layer.items()}
        return queries, (torch.cat(positions) if positions else None)

    def forget(self, req_ids) -> None:
        for req_id in req_ids:
            self.captured_queries.pop(req_id, None)
            self.captured_positions.pop(req_id, None)
