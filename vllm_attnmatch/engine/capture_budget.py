"""A memory budget for captured reference queries, accounted on the scheduler side.

A compacting request's queries are captured on the workers while its prompt is prefilled (at most
``max_query_tokens`` rows, strided) or, online, into a ring of its newest rows, and held outside vLLM's KV
pool until its compaction ends: rows × layers × query heads × head size in the model's dtype, plus one
int64 position per row. The scheduler knows every request's rows and the model's shape, so it reserves a
request's worst case when its capture starts and releases it when the capture is no longer held; a
request that does not fit is served uncompacted with the reason in its report, decided before any worker
allocates, so no capture ever runs outside the budget.

Worst cases (rows):

- a prompt compaction: ``min(span_end, max_query_tokens)`` (the stride keeps at most that many);
- an online ring: the ring peaks at three times ``online_query_tokens`` (trimmed to one ring once it holds
  two, after a step may have added up to a ring), and a re-compaction concatenates a copy beside it:
  ``2 × min(3 × online_query_tokens, max_model_len, prompt + max_tokens)`` — a ring never holds more rows
  than its request has tokens, so short generations (the common case) reserve what they can use, and a
  pool of them is not refused after the first few.

No vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20
#: Captures of the largest size the default budget holds at once.
DEFAULT_CONCURRENT_CAPTURES = 4
PREFILL = "prefill"
ONLINE = "online"


@dataclass(frozen=True)
class CaptureShape:
    """Per-device shape of one captured row."""

    num_layers: int
    num_query_heads: int  # on this device (tensor-parallel rank)
    head_size: int
    dtype_bytes: int

    @property
    def row_bytes(self) -> int:
        return self.num_layers * self.num_query_heads * self.head_size * self.dtype_bytes + 8  # + its position


def prefill_rows(span_end: int, max_query_tokens: int) -> int:
    return min(span_end, max_query_tokens)


def online_rows(ring_tokens: int, max_model_len: int, request_tokens: int | None = None) -> int:
    """Worst-case rows of an online request's ring plus a re-compaction's copy of it."""
    most = min(3 * ring_tokens, max_model_len)
    return 2 * (most if request_tokens is None else min(most, request_tokens))


def default_budget_bytes(shape: CaptureShape, max_query_tokens: int, max_model_len: int) -> int:
    return DEFAULT_CONCURRENT_CAPTURES * prefill_rows(max_model_len, max_query_tokens) * shape.row_bytes


class CaptureBudget:
    """Reservations of capture memory by request id (one reservation per request: its phase's kind)."""

    def __init__(self, limit_bytes: int, shape: CaptureShape) -> None:
        self.limit = int(limit_bytes)
        self.shape = shape
        self.used = 0
        self._held: dict[str, tuple[str, int]] = {}  # req_id -> (kind, bytes)

    def kind(self, req_id: str) -> str | None:
        held = self._held.get(req_id)
        return held[0] if held is not None else None

    def reserve(self, req_id: str, kind: str, rows: int) -> bool:
        """Reserve ``rows`` captured rows for ``req_id`` (replacing a reservation of another kind); False
        when they do not fit beside the others."""
        if self.kind(req_id) == kind:
            return True
        self.release(req_id)
        need = rows * self.shape.row_bytes
        if self.used + need > self.limit:
            return False
        self._held[req_id] = (kind, need)
        self.used += need
        return True

    def release(self, req_id: str) -> None:
        held = self._held.pop(req_id, None)
        if held is not None:
            self.used -= held[1]

    def held(self) -> dict[str, str]:
        """req_id -> kind of every reservation."""
        return {req_id: kind for req_id, (kind, _) in self._held.items()}

    def exhausted_reason(self, rows: int) -> str:
        """Why a capture of ``rows`` rows is refused, in the words a client reads."""
        need = rows * self.shape.row_bytes
        others = len(self._held)
        return (
            f"capture budget {self.limit / MIB:.1f} MiB exhausted: its reference queries need {need / MIB:.1f} MiB, "
            f"{self.used / MIB:.1f} MiB are held by {others} other compacting request{'s' if others != 1 else ''} "
            f"(server key capture_budget_mib); served uncompacted"
        )
