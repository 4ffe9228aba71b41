"""What happened to one request, for the client that sent it (``GET /v1/attnmatch/requests/{id}``).

Compactions are decided in EngineCore, but the client talks to the API server process. vLLM's output path
between the two carries fixed fields only, so, like the counters in :mod:`vllm_attnmatch.ipc.metrics`, each
engine writes its per-request reports into the run's private directory, and the front end reads them when
a client asks.

Which id answers. Reports are indexed by the engine's own request id (vLLM appends 8 random hex digits to
every id it receives, so two requests never share one) and looked up by the response ``id`` only: the id
the API server named the request with (``cmpl-<base>`` / ``chatcmpl-<base>``), which covers every prompt
and every ``n`` sample of that response. ``<base>`` is random unless the client sent ``X-Request-Id``;
such a client-chosen id is answered only in its response form (``cmpl-mine``, not ``mine``) and only while
it names a single submission: once another request reuses it (the same prompt slot under two of vLLM's
random suffixes), :func:`find_reports` raises :class:`AmbiguousId` for it and neither client reads the
other's report (HTTP 409). Knowing a random response id is what grants access, as for the response
itself; a chosen id is also scoped to the credentials it was sent with (:mod:`.report_scope`).

Which requests have one. Only requests that asked for compaction (``am_*`` keys, or a server preset that
compacts by default) are recorded: a plain request costs no memory and no write, and its id is a 404.

Bounded and constant-time:

- :class:`ReportRecorder` (EngineCore) keeps the report of every request still in the engine plus the most
  recently updated finished ones, up to ``max_reports`` (oldest dropped first, with their files). Each
  lookup key (a response id) has one small JSON file per engine, ``reports-<run>-<engine>/<sha256>.json``,
  rewritten atomically (``mkstemp`` + rename) at most once per step when one of its reports changed, before
  the step's outputs leave EngineCore, so a client that has its response can read its report.
- :func:`find_reports` (front end) opens that key's file in each engine's folder of this run: a few file
  opens whatever the number of requests, and no state in the API server (any API-server process answers).

No vLLM import: the scheduler passes in what it knows (plain values and the plugin's own dataclasses).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from vllm_attnmatch.config import ConfigError, parse_request_params, request_keys
from vllm_attnmatch.ipc.metrics import STATS_DIR_ENV, atomic_write, run_id

#: Reports each engine keeps (live requests beyond it are kept too; finished ones are dropped oldest first).
MAX_REPORTS = 4096
RANDOMIZATION_OFF_ENV = "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION"  # vLLM's switch for its 8-hex suffix

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

    def to_dict(self) -> dict[str, Any]:
        """The fields that are set (a reader restores the others as None)."""
        return {name: value for name, value in vars(self).items() if value is not None}


#: Every field, in order (what a client receives for each engine request).
REPORT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(RequestReport))


def shortest_compacted_prompt(keep_first: int, keep_last: int, min_span_tokens: int, block_size: int) -> int:
    """The fewest prompt tokens that get compacted. Mirrors :func:`vllm_attnmatch.engine.layouts.plan_layout`:
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


# -- ids: from the engine's request id to the response id a client knows --------------------------------

_ENGINE_ID = re.compile(r"(?:\d+_)?(?P<item>.+?)(?P<suffix>-[0-9a-f]{8})?")
_ENGINE_ID_PLAIN = re.compile(r"(?:\d+_)?(?P<item>.+)(?P<suffix>)")


def _randomized() -> bool:
    try:
        return not int(os.environ.get(RANDOMIZATION_OFF_ENV, "0") or "0")
    except ValueError:
        return True


def parse_engine_id(engine_id: str) -> tuple[str, str]:
    """``(item, suffix)`` of an engine request id in vLLM 0.32: ``[<i>_]<item>[-<8 hex>]``, where ``<i>_``
    names an ``n > 1`` sample (samples share their parent's suffix), ``<item>`` is the id the serving class
    passed on (``cmpl-<base>-<prompt>``, ``chatcmpl-<base>[_<sub>]``) and the suffix is the engine's random
    one (absent under VLLM_DISABLE_REQUEST_ID_RANDOMIZATION). One submission: one (item, suffix)."""
    match = (_ENGINE_ID if _randomized() else _ENGINE_ID_PLAIN).fullmatch(engine_id)
    assert match is not None  # every non-empty string matches
    return match["item"], match["suffix"] or ""


def lookup_keys(engine_id: str) -> tuple[str, ...]:
    """The response ids that may ask for this engine request. Completions always append ``-<prompt>``;
    chat appends ``_<sub>`` only for several sub-requests, so ``chatcmpl-a_1`` answers both as itself and
    as sub-request 1 of ``chatcmpl-a`` (a mix of the two under one key is refused as ambiguous)."""
    item, _ = parse_engine_id(engine_id)
    if item.startswith("cmpl-"):
        stem, dash, index = item.rpartition("-")
        if dash and index.isdigit() and len(stem) > len("cmpl-"):
            return (stem,)
    elif item.startswith("chatcmpl-"):
        stem, sep, index = item.rpartition("_")
        if sep and index.isdigit() and len(stem) > len("chatcmpl-"):
            return (item, stem)
    return (item,)


def key_file_name(key: str) -> str:
    """The file of a lookup key in each engine's folder (a hash: any id is a safe, fixed-length name)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".json"


def engine_folder(run: str, engine_index: int) -> str:
    return f"reports-{run}-{engine_index}"


class AmbiguousId(LookupError):
    """The id names requests of more than one submission (a client-chosen id that was reused)."""


@dataclass
class _KeyEntry:
    reports: dict[str, RequestReport] = field(default_factory=dict)  # engine id -> report, oldest first
    live: int = 0  # of them still in the engine
    collided: bool = False  # an engine id was seen twice (only without vLLM's random suffix)


class ReportRecorder:
    """Per-request reports of one engine (EngineCore side). ``settings`` is the server's ServerConfig.
    Every event names an engine request id; ids it does not know (never asked, or dropped) are ignored.
    ``directory`` and ``run`` default to the run directory and id the front end exported."""

    def __init__(
        self,
        settings: Any,
        block_size: int,
        engine_index: int = 0,
        directory: str | None = None,
        max_reports: int = MAX_REPORTS,
        run: str | None = None,
    ) -> None:
        self.settings = settings
        self.block_size = block_size
        self.engine_index = engine_index
        self.max_reports = max(1, max_reports)
        self.live: dict[str, RequestReport] = {}
        directory = directory if directory is not None else os.environ.get(STATS_DIR_ENV)
        run = run if run is not None else run_id()
        self._dir = Path(directory) / engine_folder(run, engine_index) if directory else None
        self._keys: OrderedDict[str, _KeyEntry] = OrderedDict()  # lookup key -> its reports, least recent first
        self._held = 0  # reports held in _keys (one per key a report is filed under)
        self._dirty: set[str] = set()  # keys whose file is out of date
        self._gone: set[str] = set()  # keys dropped whose file is still on disk
        self._made_dir = False

    # -- events (one call each from the scheduler) ----------------------------------------------------

    def admitted(self, request: Any, params: Any, layout: Any) -> None:
        """A request entered the engine (``request``: vLLM's Request). ``params`` is its EffectiveParams
        (None: nothing asked, or invalid keys), ``layout`` its planned prompt compaction (None: none)."""
        extra_args = getattr(request.sampling_params, "extra_args", None)
        asked = params is not None and (params.compacts_prefill or params.max_kv_tokens is not None)
        if not asked and not request_keys(extra_args):
            return  # never asked for compaction: no report, no write (its id is a 404)
        report = self._open(request.request_id)
        report.prompt_tokens = request.num_prompt_tokens
        if params is None:
            invalid = _invalid_keys(extra_args)  # offline callers only: the HTTP front end answers 400
            report.status, report.reason = NOT_COMPACTED, f"invalid am_* keys: {invalid}; served uncompacted"
            return self._changed(report)
        if not asked:
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

    def capture_refused(self, req_id: str, reason: str, online: bool) -> None:
        """Its captured queries would not fit in the capture budget: not compacted (online: not again)."""
        report = self.live.get(req_id)
        if report is None:
            return
        if report.compacted:
            report.note = reason  # the compaction it already has still stands
        else:
            report.status, report.reason = NOT_COMPACTED, reason
        self._changed(report)

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
        for key in lookup_keys(req_id):
            entry = self._keys.get(key)
            if entry is not None and entry.reports.get(req_id) is report:
                entry.live -= 1
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
        """Bring the files of the keys changed since the last flush up to date (once per engine step):
        drop the least recently updated finished reports beyond ``max_reports``, then rewrite each changed
        key's file and remove the files of dropped keys."""
        self._drop_oldest()
        if self._dir is None:
            self._dirty.clear()
            self._gone.clear()
            return
        if not self._dirty and not self._gone:
            return
        dirty, gone = self._dirty, self._gone
        self._dirty, self._gone = set(), set()
        try:
            if not self._made_dir:
                self._dir.mkdir(mode=0o700, exist_ok=True)
                self._made_dir = True
            for key in gone:
                try:
                    (self._dir / key_file_name(key)).unlink()
                except FileNotFoundError:
                    pass
            for key in dirty:
                entry = self._keys[key]
                body = {"key": key, "collided": entry.collided, "reports": [r.to_dict() for r in entry.reports.values()]}
                atomic_write(self._dir / key_file_name(key), json.dumps(body, separators=(",", ":")))
        except OSError:  # the front end may be gone at shutdown; reports are best effort
            pass

    def close(self) -> None:
        """Engine shutdown: remove this engine's report files (the front end removes the run directory)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    # -- internals ----------------------------------------------------------------------------------

    def _open(self, req_id: str) -> RequestReport:
        """A new report, filed under each of its lookup keys."""
        report = self.live[req_id] = RequestReport(req_id, engine=self.engine_index)
        for key in lookup_keys(req_id):
            entry = self._keys.get(key)
            if entry is None:
                entry = self._keys[key] = _KeyEntry()
            if req_id in entry.reports:  # the same engine id again (vLLM's random suffix turned off)
                entry.collided = True
                if entry.reports[req_id].finished:
                    entry.live += 1
            else:
                entry.live += 1
                self._held += 1
            entry.reports[req_id] = report
            self._gone.discard(key)
        return report

    def _changed(self, report: RequestReport) -> None:
        report.updated = time.time()
        for key in lookup_keys(report.request_id):
            if key in self._keys:
                self._keys.move_to_end(key)
                self._dirty.add(key)

    def _drop_oldest(self) -> None:
        """Forget the least recently updated keys without a live request until ``max_reports`` hold."""
        if self._held <= self.max_reports:
            return
        for key in list(self._keys):
            entry = self._keys[key]
            if entry.live > 0:
                continue
            del self._keys[key]
            self._held -= len(entry.reports)
            self._dirty.discard(key)
            self._gone.add(key)
            if self._held <= self.max_reports:
                return

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


def _invalid_keys(extra_args: Any) -> str | None:
    """The error of a request's am_* keys, or None if they are valid (or absent)."""
    try:
        parse_request_params(extra_args)
    except ConfigError as exc:
        return str(exc)
    return None


# -- front end: from the response id to the engines' reports --------------------------------------------


def find_reports(client_id: str, directory: str | Path | None = None, run: str | None = None) -> list[dict[str, Any]]:
    """The newest report of every engine request of the response ``client_id`` (empty: unknown, too old,
    or a request that never asked for compaction). Raises :class:`AmbiguousId` when the id names more
    than one submission. Opens one file per engine of the run, whatever the number of requests."""
    directory = directory if directory is not None else os.environ.get(STATS_DIR_ENV)
    run = run if run is not None else run_id()
    if not directory or not client_id:
        return []
    prefix, name = f"reports-{run}-", key_file_name(client_id)
    found: dict[str, dict[str, Any]] = {}
    collided = False
    try:
        folders = [entry.path for entry in os.scandir(directory) if entry.name.startswith(prefix)]
    except OSError:
        return []
    for folder in folders:
        try:
            body = json.loads(Path(folder, name).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # no request of this key on that engine
            continue
        if body.get("key") != client_id:  # (a hash collision)
            continue
        collided = collided or bool(body.get("collided"))
        for record in body.get("reports", ()):
            req_id = record.get("request_id", "")
            collided = collided or req_id in found  # the same engine id on two engines
            found[req_id] = record
    if collided or _several_submissions(client_id, found):
        raise AmbiguousId(client_id)
    return [{name: found[req_id].get(name) for name in REPORT_FIELDS} for req_id in sorted(found)]


def _several_submissions(key: str, engine_ids) -> bool:
    """Whether the engine requests under one key come from more than one submission: one prompt slot
    (item) under two random suffixes, or a chat id both alone and as a sub-request of the key."""
    suffix_of: dict[str, str] = {}
    for engine_id in engine_ids:
        item, suffix = parse_engine_id(engine_id)
        if suffix_of.setdefault(item, suffix) != suffix:
            return True
    return key in suffix_of and len(suffix_of) > 1
