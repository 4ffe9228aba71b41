"""Compaction counters on the server's ``/metrics``.

The counters are kept where compactions are decided (the scheduler, in the EngineCore process) but
``/metrics`` is served by the API server process. vLLM's stats path between the two carries only fixed
fields, so EngineCore writes its counters to a small JSON file (atomically, at most once per step with
news) in a directory the front end created, and a Prometheus collector registered in the front end reads
those files at scrape time. No vLLM import: the scheduler and the hook pass in what they know.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

STATS_DIR_ENV = "VLLM_ATTNMATCH_STATS_DIR"
PREFIX = "vllm_attnmatch_"

#: counter name -> help text (exported as ``vllm_attnmatch_<name>_total``)
COUNTERS: dict[str, str] = {
    "compactions": "Compactions applied to requests' KV caches",
    "prefill_compactions": "Compactions of a prompt prefix right after its prefill",
    "online_compactions": "Re-compactions of a request whose KV reached its ceiling (am_max_kv_tokens)",
    "failures": "Compactions that failed; the request was served uncompacted",
    "skipped": "Compactions not attempted (prompt too short or no free blocks); served uncompacted",
    "tokens_before": "KV entries of compacted requests before compaction",
    "tokens_after": "KV entries of compacted requests after compaction",
    "compaction_seconds": "Seconds spent compacting (worker side)",
    "reference_query_seconds": "Seconds spent producing repeat / self_study reference queries (part of compaction_seconds)",
    "blocks_freed": "KV blocks returned to the pool by compactions",
    "prefix_hits": "Requests that reused a compacted prefix",
    "prefix_misses": "Compacting requests that found no reusable compacted prefix",
    "prefix_evictions": "Stored compacted prefixes evicted from the KV pool (a block reused for other KV)",
    "prefill_tokens_saved": "Prompt tokens not prefilled thanks to compacted-prefix hits",
}

#: gauge name -> help text (exported as ``vllm_attnmatch_<name>``; summed over engines)
GAUGES: dict[str, str] = {
    "kv_free_blocks": "KV blocks free in the pool (including evictable prefix-cache blocks)",
    "kv_total_blocks": "KV blocks in the pool",
}


class CompactionStats:
    """Monotonic counters of one engine; ``flush`` publishes them for the front end's collector."""

    def __init__(self, engine_index: int = 0, stats_dir: str | None = None) -> None:
        self.values: dict[str, float] = {name: 0.0 for name in (*COUNTERS, *GAUGES)}
        directory = stats_dir if stats_dir is not None else os.environ.get(STATS_DIR_ENV)
        self._path = Path(directory) / f"engine-{engine_index}-{os.getpid()}.json" if directory else None
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
        tmp = self._path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.values))
            tmp.replace(self._path)
        except OSError:  # the front end may be gone at shutdown; counters are best effort
            pass


def read_totals(stats_dir: str | Path) -> dict[str, float]:
    """Sum the counters of every engine that wrote into ``stats_dir``."""
    totals = {name: 0.0 for name in (*COUNTERS, *GAUGES)}
    for path in Path(stats_dir).glob("engine-*.json"):
        try:
            values = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name in totals:
            totals[name] += float(values.get(name, 0.0))
    return totals


class _StatsFileCollector:
    def __init__(self, stats_dir: str) -> None:
        self.stats_dir = stats_dir

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        totals = read_totals(self.stats_dir)
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, help_text)
            family.add_metric([], totals[name])
            yield family
        for name, help_text in GAUGES.items():
            yield GaugeMetricFamily(PREFIX + name, help_text, value=totals[name])


_install_lock = threading.Lock()
_installed_dir: str | None = None


def install_collector() -> str:
    """Create the stats directory (inherited by EngineCore through the environment) and register the
    collector on the default Prometheus registry, which vLLM's ``/metrics`` serves. Idempotent."""
    global _installed_dir
    with _install_lock:
        if _installed_dir is not None:
            return _installed_dir
        directory = os.environ.get(STATS_DIR_ENV) or tempfile.mkdtemp(prefix="vllm-attnmatch-stats-")
        os.environ[STATS_DIR_ENV] = directory
        try:
            from prometheus_client import REGISTRY

            REGISTRY.register(_StatsFileCollector(directory))
        except ImportError:  # pragma: no cover - vLLM always ships prometheus_client
            pass
        _installed_dir = directory
        return directory
