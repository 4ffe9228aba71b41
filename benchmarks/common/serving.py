"""The server a benchmark talks to: one it starts itself (``harness.server.Server``) or one given by URL.

Why one module: every suite needs the same few calls — prompt logprobs, a timed streaming completion, a
chat completion, a ``/metrics`` snapshot, the KV block size — and the same rule that a server we start
is stopped again, and that only one runs at a time (startup and prefill share the CPU cores).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Self

import requests

PLUGIN = {"attnmatch": {"preset": "default"}}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ServerSpec:
    """How to start a server; two suites with equal specs share one."""

    name: str
    additional_config_json: str | None = json.dumps(PLUGIN)
    extra_args: tuple[str, ...] = ()
    kv_cache_gib: float = 2
    max_model_len: int = 4096

    def num_blocks(self) -> int | None:
        """KV blocks of the pool as vLLM reports them (``vllm:cache_config_info``)."""
        blocks = parse_labels(self.metrics_text(), "vllm:cache_config_info").get("num_gpu_blocks")
        return int(blocks) if blocks and blocks.isdigit() else None

    def describe(self) -> dict:
        return {
            "additional_config": json.loads(self.additional_config_json) if self.additional_config_json else None,
            "extra_args": list(self.extra_args),
            "kv_cache_gib": self.kv_cache_gib,
            "max_model_len": self.max_model_len,
        }


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {sample name: value summed over label sets} (histograms keep _sum/_count)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return values


def parse_labels(text: str, name: str) -> dict[str, str]:
    """Labels of the first sample named ``name`` (e.g. ``vllm:cache_config_info``)."""
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(1) == name and m.group(2):
            return dict(_LABEL.findall(m.group(2)))
    return {}


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


@dataclass
class Stream:
    """Client-side timing of one streamed completion."""

    ttft_s: float
    total_s: float
    token_times: list[float] = field(default_factory=list)
    text: str = ""
    id: str | None = None  # the response id (what the plugin's per-request report is looked up by)

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (decode step time as the client sees it)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


class Endpoint:
    """An OpenAI-compatible vLLM server at ``url`` serving ``model``."""

    def __init__(self, url: str, model: str = "smollm2", spec: ServerSpec | None = None):
        self.url, self.model, self.spec = url.rstrip("/"), model, spec

    # -- metrics ------------------------------------------------------------------------------------
    def metrics_text(self) -> str:
        return requests.get(self.url + "/metrics", timeout=30).text

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.metrics_text())

    def block_size(self, default: int = 16) -> int:
        size = parse_labels(self.metrics_text(), "vllm:cache_config_info").get("block_size")
        return int(size) if size and size.isdigit() else default

    def num_blocks(self) -> int | None:
        """KV blocks of the pool as vLLM reports them (``vllm:cache_config_info``)."""
        blocks = parse_labels(self.metrics_text(), "vllm:cache_config_info").get("num_gpu_blocks")
        return int(blocks) if blocks and blocks.isdigit() else None

    def describe(self) -> dict:
        info = {"url": self.url, "model": self.model, "started_here": self.spec is not None}
        try:
            info["server_version"] = requests.get(self.url + "/version", timeout=10).json().get("version")
        except (requests.RequestException, ValueError):
            pass
        labels = parse_labels(self.metrics_text(), "vllm:cache_config_info")
        info["cache_config"] = {k: labels[k] for k in ("block_size", "num_gpu_blocks", "enable_prefix_caching") if k in labels}
        if self.spec is not None:
            info["launch"] = self.spec.describe()
        return info

    # -- requests -----------------------------------------------------------------------------------
    def _body(self, prompt, max_tokens: int, xargs: dict | None, salt: str | None, **extra) -> dict:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
        if xargs:
            body["vllm_xargs"] = xargs
        if salt:
            body["cache_salt"] = salt
        return body

    def prompt_logprobs(self, ids: list[int], xargs: dict | None = None, top: int = 20, salt: str | None = None):
        """Per prompt position {token: logprob} (top ``top`` plus the actual token), and the seconds taken."""
        body = self._body(ids, 1, xargs, salt, prompt_logprobs=top)
        started = time.perf_counter()
        response = requests.post(self.url + "/v1/completions", json=body, timeout=3600)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        seconds = time.perf_counter() - started
        rows = response.json()["choices"][0]["prompt_logprobs"]
        return [{int(k): v["logprob"] for k, v in row.items()} if row else None for row in rows], seconds

    def stream(self, prompt, max_tokens: int, xargs: dict | None = None, salt: str | None = None,
               ignore_eos: bool = True) -> Stream:
        """A streamed greedy completion, timed per chunk (vLLM sends one chunk per engine step)."""
        body = self._body(prompt, max_tokens, xargs, salt, stream=True, ignore_eos=ignore_eos)
        started = time.perf_counter()
        times, text, response_id = [], "", None
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=3600) as response:
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                response_id = response_id or chunk.get("id")
                if chunk.get("choices"):
                    times.append(time.perf_counter() - started)
                    text += chunk["choices"][0].get("text") or ""
        return Stream(ttft_s=times[0] if times else float("nan"), total_s=time.perf_counter() - started,
                      token_times=times, text=text, id=response_id)

    def report(self, request_id: str) -> dict | None:
        """The plugin's per-request report (``GET /v1/attnmatch/requests/{id}``), or None if it has none."""
        response = requests.get(f"{self.url}/v1/attnmatch/requests/{request_id}", timeout=30)
        return response.json() if response.status_code == 200 else None

    def chat(self, content: str, max_tokens: int) -> tuple[str, float]:
        """A greedy chat completion (the model's chat template), and the seconds taken."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens, "temperature": 0}
        started = time.perf_counter()
        response = requests.post(self.url + "/v1/chat/completions", json=body, timeout=3600)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        return response.json()["choices"][0]["message"]["content"] or "", time.perf_counter() - started


class Watcher:
    """Polls ``/metrics`` in the background and keeps the minimum / maximum of a few gauges."""

    def __init__(self, endpoint: Endpoint, gauges: tuple[str, ...], period_s: float = 0.25):
        self.endpoint, self.gauges, self.period_s = endpoint, gauges, period_s
        first = endpoint.metrics()
        self.start = {g: first.get(g) for g in gauges}
        self.low = dict(self.start)
        self.high = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        values = self.endpoint.metrics()
        for g in self.gauges:
            if g in values:
                v = values[g]
                self.low[g] = v if self.low[g] is None else min(self.low[g], v)
                self.high[g] = v if self.high[g] is None else max(self.high[g], v)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._sample()
            except requests.RequestException:
                pass

    def stop(self) -> Watcher:
        self._stop.set()
        self._thread.join()
        self._sample()
        return self


#: The gauges a pool's peak occupancy is read from: the plugin's free blocks and vLLM's usage fraction.
FREE_BLOCKS, KV_USAGE = "vllm_attnmatch_kv_free_blocks", "vllm:kv_cache_usage_perc"


def peak_blocks_held(watcher: Watcher, total: float | None) -> float | None:
    """Most KV blocks held at once while ``watcher`` ran (it must watch both gauges): the two gauges are
    sampled at different moments (and stock vLLM has no free-block gauge), so the larger of what either saw."""
    start = watcher.start.get(FREE_BLOCKS)
    by_free = start - watcher.low[FREE_BLOCKS] if start is not None else None
    usage = watcher.high.get(KV_USAGE)
    by_usage = round(usage * total) if usage is not None and total else None
    return max((v for v in (by_free, by_usage) if v is not None), default=None)


class Servers:
    """Hands out endpoints for server specs: the ``--url`` server for every spec, or a server started here.

    Starts at most one at a time and stops it when a suite needs a different one, or on exit.
    """

    def __init__(self, url: str | None = None, model: str = "smollm2"):
        self.url, self.model = url, model
        self._server = None
        self._endpoint: Endpoint | None = None

    def get(self, spec: ServerSpec) -> Endpoint:
        if self.url:
            return Endpoint(self.url, self.model)
        if self._endpoint is not None and self._endpoint.spec == spec:
            return self._endpoint
        self.close()
        from harness.server import Server
        from vllm_attnmatch.model import ensure_model

        config = json.loads(spec.additional_config_json) if spec.additional_config_json else None
        print(f"starting server '{spec.name}' ({' '.join(spec.extra_args) or 'default flags'}); about a minute on CPU",
              file=sys.stderr, flush=True)
        self._server = Server(f"bench-{spec.name}", ensure_model(), config, list(spec.extra_args),
                              kv_cache_gib=spec.kv_cache_gib, max_model_len=spec.max_model_len, dumps=False)
        self._server.wait_ready()
        self._endpoint = Endpoint(self._server.url, "smollm2", spec)
        return self._endpoint

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
        self._server = self._endpoint = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
