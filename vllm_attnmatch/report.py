"""What happened to one request, for the client that sent it (``GET /v1/attnmatch/requests/{id}``).

Compactions are decided in EngineCore, but the client talks to the API server process. vLLM's output path
between the two carries fixed fields only, so, like the counters in :mod:`vllm_attnmatch.metrics`, each
engine writes its per-request reports to a file in the directory the front end created, and the front end
reads them when a client asks:

- :class:`ReportRecorder` (EngineCore) keeps the report of every request still in the engine, and appends
  a snapshot line (JSON) to ``reports-<engine>-<pid>.jsonl`` whenever one changes. Lines are written once
  per step (``flush``), before the step's outputs leave EngineCore, so a client that has its response can
  read its report. The file is rotated after ``max_lines`` lines (the previous one is kept as ``.old``) and
  the reports of live requests are written again into the fresh file: disk and memory stay bounded, and a
  report stays findable for at least the last ``max_lines`` updates of its engine.
- :func:`find_reports` (front end) maps the id the client knows (the response ``id``, or the
  ``X-Request-Id`` it sent) to the engine's request ids and returns the newest snapshot of each.

No vLLM import: the scheduler passes in what it knows (plain values and the plugin's own dataclasses).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vllm_attnmatch.config import ConfigError, parse_request_params, request_keys
from vllm_attnmatch.metrics import STATS_DIR_ENV

#: Report lines per file before rotation (two files per engine: the current one and the previous one).
MAX_LINES = 4096
_FILE_GLOB = "reports-*.jsonl"

# Statuses, in the words a client reads.
NOT_REQUESTED = "not_requested"  # no am_* keys and no server default: served as stock vLLM
PENDING = "pending"  # will compact (after its prompt's prefill, or when its KV reaches its ceiling)
COMPACTED = "compacted"  # at least one compaction was applied to its KV cache
NOT_COMPACTED = "not_compacted"  # asked for, but not attempted (``reason`` says why); served uncompacted
FAILED = "failed"  # attempted and failed (``reason`` has the error); served uncompacted
STATUSES = (NOT_REQUESTED, PENDING, COMPACTED, NOT_COMPACTED, FAILED)

NOT_REQUESTED_REASON = "no am_* keys in vllm_xargs and the server's preset does not compact by default"
NO_BUDGET_REASON = (
    "no budget: am_* keys without am_ratio, am_target_tokens or am_max_kv_tokens, and the server's preset "
    "sets none"
)


@dataclass
class RequestReport:
    """One engine request's compaction, as the client sees it. Token counts are KV entries; ``tokens_*``
    and ``blocks_*`` are the prompt compaction's T → t (the whole KV of the request at that moment)."""

    request_id: str  # the engine's request id (the client's id plus vLLM's suffixes)
    status: str = NOT_REQUESTED
    compacted: bool = False
    reason: str | None = NOT_REQUESTED_REASON
    finished: bool = False
    prompt_tokens: int | None = None
    # What was asked (the request's am_* keys over the server defaults).
    method: str | None = None
    queries: str | None = None  # the reference-query source used (asked for until a compaction ran)
    ratio: float | None = None
    target_tokens: int | None = None
    keep_first: int | None = None
    keep_last: int | None = None
    max_kv_tokens: int | None = None
    # The prompt compaction (or the compacted prefix reused from an earlier request).
    tokens_before: int | None = None
    tokens_after: int | None = None
    span_tokens_before: int | None = None  # the compacted span alone (without keep_first and the raw tail)
    span_tokens_after: int | None = None
    blocks_before: int | None = None
    blocks_after: int | None = None
    seconds: float | None = None  # compaction time on the workers (0 for a prefix hit)
    seconds_by_component: dict[str, float] | None = None  # gather, scoring, beta, values, write, … (sums to ≈ seconds)
    fit_error: float | None = None
    prefix_hit: bool = False  # the compacted prefix was reused from an earlier request
    prefill_tokens_saved: int = 0
    # Online mode: re-compactions each time its KV reached am_max_kv_tokens.
    online_compactions: int = 0
    online_seconds: float = 0.0
    online_last_tokens_before: int | None = None
    online_last_tokens_after: int | None = None
    note: str | None = None  # a later event that did not change the status (online stop or retry, …)
    peak_kv_tokens: int | None = None
    engine: int = 0
    updated: float = 0.0  # unix time of this snapshot

    def to_line(self, seq: int) -> str:
        """One file line: the fields that are set (a reader restores the others as None)."""
        present = {name: value for name, value in vars(self).items() if value is not None}
        return json.dumps({"seq": seq, **present}, separators=(",", ":")) + "\n"


#: Every field, in order (what a client receives for each engine request).
REPORT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RequestReport))


def shortest_compacted_prompt(keep_first: int, keep_last: int, min_span_tokens: int, block_size: int) -> int:
    """The fewest prompt tokens that get compacted. Mirrors :func:`vllm_attnmatch.engine.jobs.plan_layout`:
    the span ``[keep_first, span_end)`` holds ``min_span_tokens`` and ends at a block boundary that leaves
    ``max(keep_last, 1)`` prompt tokens raw."""
    span_end = -(-(keep_first + max(1, min_span_tokens)) // block_size) * block_size
    return span_end + max(keep_last, 1)


def too_short_reason(prompt_tokens: int, keep_first: int, keep_last: int, min_span_tokens: int, block_size: int) -> str:
    """Why a prompt is too short to compact, with the prompt length that would be compacted."""
    needed = shortest_compacted_prompt(keep_first, keep_last, min_span_tokens, block_size)
    return (
        f"prompt too short: {prompt_tokens} tokens; compaction needs at least {needed} "
        f"(keep_first={keep_first} + min_prompt_tokens={min_span_tokens}, rounded up to a "
        f"{block_size}-token KV block, + keep_last={keep_last}); served uncompacted"
    )


class ReportRecorder:
    """Per-request reports of one engine (EngineCore side). ``settings`` is the server's ServerConfig.
    Every event names an engine request id; ids it does not know (already finished) are ignored."""

    def __init__(
        self, settings: Any, block_size: int, engine_index: int = 0, directory: str | None = None, max_lines: int = MAX_LINES
    ) -> None:
        self.settings = settings
        self.block_size = block_size
        self.engine_index = engine_index
        self.max_lines = max(1, max_lines)
        self.live: dict[str, RequestReport] = {}
        directory = directory if directory is not None else os.environ.get(STATS_DIR_ENV)
        stem = f"reports-{engine_index}-{os.getpid()}"
        self._path = Path(directory) / f"{stem}.jsonl" if directory else None
        self._old_path = Path(directory) / f"{stem}.old.jsonl" if directory else None
        self._pending: dict[str, RequestReport] = {}  # changed since the last flush (newest snapshot)
        self._file = None
        self._lines = 0
        self._seq = 0

    # -- events (one call each from the scheduler) ----------------------------------------------------

    def admitted(self, request: Any, params: Any, layout: Any) -> None:
        """A request entered the engine (``request``: vLLM's Request). ``params`` is its EffectiveParams
        (None: nothing asked, or invalid keys), ``layout`` its planned prompt compaction (None: none)."""
        req_id = request.request_id
        report = self.live[req_id] = RequestReport(req_id, engine=self.engine_index)
        report.prompt_tokens = request.num_prompt_tokens
        extra_args = getattr(request.sampling_params, "extra_args", None)
        if params is None:
            invalid = _invalid_keys(extra_args)
            if invalid:  # offline callers only: the HTTP front end answers 400
                report.status, report.reason = NOT_COMPACTED, f"invalid am_* keys: {invalid}; served uncompacted"
            return self._changed(report)
        if not params.compacts_prefill and params.max_kv_tokens is None:
            if request_keys(extra_args):
                report.reason = NO_BUDGET_REASON
            return self._changed(report)
        for name in ("method", "queries", "ratio", "target_tokens", "keep_first", "keep_last", "max_kv_tokens"):
            setattr(report, name, getattr(params, name))
        too_short = layout is None and (params.ratio is not None or params.target_tokens is not None)
        report.reason = self._too_short(report) if too_short else None
        # An online request still compacts at its ceiling even when its prompt is too short.
        report.status = PENDING if layout is not None or params.max_kv_tokens is not None else NOT_COMPACTED
        self._changed(report)

    def prefix_hit(self, req_id: str, layout: Any) -> None:
        """The request starts from a stored compacted prefix (its ``layout``) instead of compacting."""
        report = self.live.get(req_id)
        if report is None:
            return
        self._applied(report)
        report.prefix_hit = True
        report.prefill_tokens_saved = layout.span_end
        report.tokens_before, report.tokens_after = layout.span_end, layout.prefix_physical_len
        report.span_tokens_before, report.span_tokens_after = layout.span_tokens, layout.target
        report.blocks_before = -(-layout.span_end // self.block_size)
        report.blocks_after = layout.prefix_physical_len // self.block_size
        report.seconds, report.fit_error = 0.0, None
        self._changed(report)

    def booked(self, job: Any, result: Any, applied: bool) -> None:
        """A job's result came back (``job`` a CompactionJob, ``result`` its CompactionResult or None);
        ``applied``: its blocks were swapped in."""
        report = self.live.get(job.req_id)
        if report is None:
            return
        if not applied:
            if result is None or not result.ok:  # (an ok result not applied: the request is gone)
                error = result.error if result is not None else "no result from the workers"
                self._not_applied(report, FAILED, f"compaction failed: {error}; served uncompacted", job.layout.online)
            return
        self._applied(report)
        layout = job.layout
        if layout.online:
            report.online_compactions += 1
            report.online_seconds += result.seconds
            report.online_last_tokens_before, report.online_last_tokens_after = layout.num_tokens, layout.physical_len
            report.note = None
        else:
            report.prefix_hit = False
            report.queries = result.query_source
            report.tokens_before, report.tokens_after = layout.num_tokens, layout.physical_len
            report.span_tokens_before, report.span_tokens_after = layout.span_tokens, layout.target
            report.blocks_before, report.blocks_after = len(job.src_block_ids), len(job.dst_block_ids)
            report.seconds = result.seconds
            report.seconds_by_component = {k: round(v, 4) for k, v in result.timings.items()} or None
            report.fit_error = result.fit_error if result.fit_error == result.fit_error else None  # NaN: unknown
        self._changed(report)

    def no_free_blocks(self, req_id: str, online: bool) -> None:
        """The pool had no free blocks for the compacted copy when the compaction was due."""
        if online:
            self.skipped(req_id, "no free KV blocks for the compacted copy at the ceiling; retrying a block later", True)
        else:
            self.skipped(req_id, "no free KV blocks for the compacted copy when its prefill ended; served uncompacted")

    def nothing_to_compact(self, req_id: str) -> None:
        """Online: the ceiling leaves nothing between the sinks and the protected recent window."""
        self.skipped(
            req_id,
            "its KV ceiling leaves nothing to compact after keep_first and online_recent_tokens; "
            "it grows past the ceiling",
            online=True,
        )

    def skipped(self, req_id: str, reason: str, online: bool = False) -> None:
        """A compaction was not attempted (no free blocks, nothing to compact under the ceiling, …)."""
        report = self.live.get(req_id)
        if report is not None:
            self._not_applied(report, NOT_COMPACTED, reason, online)

    def finished(self, req_id: str, peak_kv_tokens: int | None = None) -> None:
        """The request left the engine: settle a still-pending status and forget it."""
        report = self.live.pop(req_id, None)
        if report is None:
            return
        report.finished = True
        if report.max_kv_tokens is not None:
            report.peak_kv_tokens = peak_kv_tokens
            limit = getattr(self.settings, "online_max_compactions", None)
            if limit is not None and report.online_compactions >= limit:
                report.note = f"online_max_compactions={limit} reached; it grew past its ceiling"
        if report.status == PENDING:
            report.status = NOT_COMPACTED
            if report.max_kv_tokens is not None:
                never = f"its KV never reached the ceiling am_max_kv_tokens={report.max_kv_tokens}" + (
                    f" (peak {peak_kv_tokens} entries)" if peak_kv_tokens else ""
                )
                report.reason = never if report.reason is None else f"{report.reason}; {never}"
            else:
                report.reason = "finished or aborted before its compaction was applied"
        self._changed(report)

    # -- publishing ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Append the snapshots changed since the last flush (once per engine step)."""
        if not self._pending or self._path is None:
            self._pending.clear()
            return
        pending, self._pending = self._pending, {}
        try:
            if self._file is None or self._lines >= self.max_lines:
                self._rotate(skip=pending)
            self._write(pending.values())
        except OSError:  # the front end may be gone at shutdown; reports are best effort
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    # -- internals ----------------------------------------------------------------------------------

    def _changed(self, report: RequestReport) -> None:
        report.updated = time.time()
        self._pending[report.request_id] = report

    def _applied(self, report: RequestReport) -> None:
        report.status, report.compacted, report.reason = COMPACTED, True, None

    def _not_applied(self, report: RequestReport, status: str, reason: str, online: bool) -> None:
        if online or report.compacted:
            report.note = reason  # the prompt compaction (if any) still stands
        else:
            report.status, report.reason = status, reason
        self._changed(report)

    def _too_short(self, report: RequestReport) -> str:
        settings = self.settings
        return too_short_reason(
            report.prompt_tokens, report.keep_first, report.keep_last, settings.min_prompt_tokens, self.block_size
        )

    def _rotate(self, skip: dict[str, RequestReport]) -> None:
        """Start a fresh file (keeping the previous one as ``.old``) holding every live report."""
        if self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._path, self._old_path)
        self._file = self._path.open("a", encoding="utf-8")
        self._lines = 0
        self._write(r for r in self.live.values() if r.request_id not in skip)

    def _write(self, reports) -> None:
        lines = []
        for report in reports:
            self._seq += 1
            lines.append(report.to_line(self._seq))
        if lines:
            self._file.write("".join(lines))
            self._file.flush()
            self._lines += len(lines)


def _invalid_keys(extra_args: Any) -> str | None:
    """The error of a request's am_* keys, or None if they are valid (or absent)."""
    try:
        parse_request_params(extra_args)
    except ConfigError as exc:
        return str(exc)
    return None


# -- front end: from the id the client knows to the engine's reports ---------------------------------


def id_pattern(client_id: str) -> re.Pattern[str]:
    """Engine request ids that belong to ``client_id`` in vLLM 0.32's OpenAI server.

    The server names a request ``cmpl-<base>`` / ``chatcmpl-<base>`` (``<base>``: the ``X-Request-Id``
    header or a random id) and returns that as the response ``id``; a prompt of a batch or a sub-request
    appends ``-<i>`` / ``_<i>``, the engine appends ``-<8 hex>`` (unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION)
    and ``n > 1`` makes children ``<i>_<id>``. The client may pass the response ``id`` or its X-Request-Id.
    """
    return re.compile(r"(?:\d+_)?(?:cmpl-|chatcmpl-)?" + re.escape(client_id) + r"(?:[-_]\d+)?(?:-[0-9a-f]{8})?")


def find_reports(client_id: str, directory: str | Path | None = None) -> list[dict[str, Any]]:
    """The newest report of every engine request of ``client_id`` (empty: unknown or too old)."""
    directory = directory if directory is not None else os.environ.get(STATS_DIR_ENV)
    if not directory or not client_id:
        return []
    pattern = id_pattern(client_id)
    needle = json.dumps(client_id)[1:-1]
    newest: dict[str, dict[str, Any]] = {}
    # The current files before the .old ones: a rotation in between then yields duplicates, never a gap.
    paths = sorted(Path(directory).glob(_FILE_GLOB), key=lambda p: p.name.endswith(".old.jsonl"))
    for path in paths:
        try:
            with path.open(encoding="utf-8") as handle:
                for line in handle:
                    if needle not in line:
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line being written
                        continue
                    req_id = record.get("request_id", "")
                    if not pattern.fullmatch(req_id):
                        continue
                    seen = newest.get(req_id)
                    if seen is None or record["seq"] > seen["seq"]:  # one request lives on one engine
                        newest[req_id] = record
        except OSError:  # rotated away while listing: its lines are in the other file
            continue
    return [{name: newest[req_id].get(name) for name in REPORT_FIELDS} for req_id in sorted(newest)]
