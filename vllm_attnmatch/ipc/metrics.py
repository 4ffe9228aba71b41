"""Compaction counters on the server's ``/metrics``.

The counters are kept where compactions are decided (the scheduler, in the EngineCore process) but
``/metrics`` is served by the API server process. vLLM's stats path between the two carries only fixed
fields, so EngineCore writes its counters to a small JSON file (atomically, at most once per step with
news) in a directory the front end created, and a Prometheus collector registered in the front end reads
those files at scrape time. No vLLM import: the scheduler and the hook pass in what they know.

The directory (shared with the per-request reports of :mod:`vllm_attnmatch.ipc.report`) is private to the run:
the front end creates a fresh one with ``tempfile.mkdtemp`` (mode 0700) and a random run id, passes both to
EngineCore (and to further API-server processes) through the environment, and removes the directory when it
exits. Every file name carries the run id and readers take only their own run's files, so a directory
inherited from elsewhere never adds its counters; temporary files are ``mkstemp`` names (unpredictable,
mode 0600) renamed into place.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
from pathlib import Path

STATS_DIR_ENV = "VLLM_ATTNMATCH_STATS_DIR"
RUN_ID_ENV = "ATTNMATCH_RUN_ID"  # no VLLM_ prefix: vLLM warns about VLLM_* names it does not know
_RUN_ID = re.compile(r"[0-9a-f]{16}")
PREFIX = "vllm_attnmatch_"

#: counter name -> help text (exported as ``vllm_attnmatch_<name>_total``)
COUNTERS: dict[str, str] = {
    "compactions": "Compactions applied to requests' KV caches",
    "prefill_compactions": "Compactions of a prompt prefix right after its prefill",
    "online_compactions": "Re-compactions of a request whose KV reached its ceiling (am_max_kv_tokens)",
    "failures": "Compactions that failed; the request was served uncompacted",
    "skipped": "Compactions not attempted (prompt too short, or no free blocks and no compaction in flight to free some); served uncompacted",
    "tokens_before": "KV entries of compacted requests before compaction",
    "tokens_after": "KV entries of compacted requests after compaction",
    "compaction_seconds": "Seconds spent compacting (worker side)",
    "reference_query_seconds": "Seconds spent producing repeat / self_study reference queries (part of compaction_seconds)",
    "blocks_freed": "KV blocks returned to the pool by compactions",
    "prefix_hits": "Requests that reused a compacted prefix",
    "prefix_misses": "Compacting requests that found no reusable compacted prefix",
    "prefix_evictions": "Stored compacted prefixes evicted from the KV pool (a block reused for other KV)",
    "prefill_tokens_saved": "Prompt tokens not prefilled thanks to compacted-prefix hits",
    "capture_refused": "Requests whose compaction was not attempted (counted once each): their captured queries did not fit in capture_budget_mib",
}

#: gauge name -> help text (exported as ``vllm_attnmatch_<name>``; summed over engines)
GAUGES: dict[str, str] = {
    "kv_free_blocks": "KV blocks free in the pool (including evictable prefix-cache blocks)",
    "kv_total_blocks": "KV blocks in the pool",
    "capture_budget_bytes": "Memory budget for captured reference queries (capture_budget_mib), per device",
    "capture_reserved_bytes": "Memory reserved now for captured reference queries, per device",
}


def run_id() -> str:
    """This run's id (from the environment the front end set; "" outside a server)."""
    return os.environ.get(RUN_ID_ENV, "")


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through an unpredictable temporary name in the same directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class CompactionStats:
    """Monotonic counters of one engine; ``flush`` publishes them for the front end's collector."""

    def __init__(self, engine_index: int = 0, stats_dir: str | None = None, run: str | None = None) -> None:
        self.values: dict[str, float] = {name: 0.0 for name in (*COUNTERS, *GAUGES)}
        directory = stats_dir if stats_dir is not None else os.environ.get(STATS_DIR_ENV)
        run = run if run is not None else run_id()
        self._path = Path(directory) / f"engine-{run}-{engine_index}-{os.getpid()}.json" if directory else None
        self._dirty = False

    def add(self, name: str, amount: float = 1.0) -> None:
        self.values[name] += amount
        self._dirty = True

    def set(self, name: str, value: float) -> None:
        if self.values[name] != value:
            self.values[name] = value
            self._dirty = True

    def flush(self) -> None:
        if not self._dirty or self._path is None:
            return
        self._dirty = False
        try:
            atomic_write(self._path, json.dumps(self.values))
        except OSError:  # the front end may be gone at shutdown; counters are best effort
            pass


def read_totals(stats_dir: str | Path, run: str | None = None) -> dict[str, float]:
    """Sum the counters of every engine of this run (``run``; default: this process's) in ``stats_dir``."""
    run = run if run is not None else run_id()
    totals = {name: 0.0 for name in (*COUNTERS, *GAUGES)}
    for path in Path(stats_dir).glob(f"engine-{glob_escape(run)}-*.json"):
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name in totals:
            totals[name] += float(values.get(name, 0.0))
    return totals


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


class _StatsFileCollector:
    def __init__(self, stats_dir: str, run: str) -> None:
        self.stats_dir = stats_dir
        self.run = run

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = read_totals(self.stats_dir, self.run)
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, help_text)
            family.add_metric([], totals[name])
            yield family
        for name, help_text in GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, help_text, value=totals[name])


_install_lock = threading.Lock()
_installed_dir: str | None = None


def _inherited_dir() -> str | None:
    """The run directory a parent process of this run created, or None: it must exist, belong to this
    user, be private (no group or other access), and come with a well-formed run id."""
    directory = os.environ.get(STATS_DIR_ENV)
    if not directory or not _RUN_ID.fullmatch(run_id()):
        return None
    try:
        info = os.lstat(directory)
    except OSError:
        return None
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077
    return directory if private else None


def remove_run_dir(directory: str) -> None:
    """Remove the run directory (at the creating process's exit)."""
    shutil.rmtree(directory, ignore_errors=True)


def create_run_dir() -> str:
    """Create the run's private directory and id, export both to child processes, and remove the
    directory when this process exits."""
    directory = tempfile.mkdtemp(prefix="vllm-attnmatch-")  # mode 0700, a unique name
    os.environ[STATS_DIR_ENV] = directory
    os.environ[RUN_ID_ENV] = secrets.token_hex(8)
    atexit.register(remove_run_dir, directory)
    return directory


def install_collector() -> str:
    """Create the run directory (inherited by EngineCore through the environment; a process started by
    the one that created it reuses it) and register the collector on the default Prometheus registry,
    which vLLM's ``/metrics`` serves. Idempotent."""
    global _installed_dir
    with _install_lock:
        if _installed_dir is not None:
            return _installed_dir
        directory = _inherited_dir() or create_run_dir()
        try:
            from prometheus_client import REGISTRY

            REGISTRY.register(_StatsFileCollector(directory, run_id()))
        except ImportError:  # pragma: no cover - vLLM always ships prometheus_client
            pass
        _installed_dir = directory
        return directory
