"""Start and talk to a real vLLM OpenAI server (CPU launch line) from tests and benchmarks.

Why here: the end-to-end tests and the benchmarks need the same thing — a server process on a free
port, its log, its health, and the plugin's ``/metrics`` samples — and this keeps it in one place.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

STARTUP_TIMEOUT_S = 900


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The project's console script (``vllm serve`` that also works with the CPU wheel), next to this Python.
CONSOLE_SCRIPT = Path(sys.executable).parent / "vllm-attnmatch"


def launch_command(model: Path | str, console_script: bool) -> list[str]:
    """The documented ``vllm-attnmatch serve MODEL``, or vLLM's server module (same parser, same server)."""
    if console_script:
        if not CONSOLE_SCRIPT.is_file():
            raise FileNotFoundError(f"{CONSOLE_SCRIPT} is missing: install the project (pip install -e .)")
        return [str(CONSOLE_SCRIPT), "serve", str(model)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]


def config_args(additional_config: dict | None, config_via: str = "flag") -> list[str]:
    """Command-line form of the settings: the ``attnmatch`` section through the plugin's ``--attnmatch``
    flag (a preset name given as a string stays a bare name), anything else through ``--additional-config``;
    ``config_via="additional-config"`` passes everything the old way (both forms are equivalent)."""
    if additional_config is None:
        return []
    if config_via == "additional-config":
        return ["--additional-config", json.dumps(additional_config)]
    if config_via != "flag":
        raise ValueError(f"config_via must be 'flag' or 'additional-config', not {config_via!r}")
    rest = {k: v for k, v in additional_config.items() if k != "attnmatch"}
    args = ["--additional-config", json.dumps(rest)] if rest else []
    if "attnmatch" in additional_config:
        section = additional_config["attnmatch"]
        args += ["--attnmatch", section if isinstance(section, str) else json.dumps(section)]
    return args


class Server:
    """One vLLM OpenAI server process (``vllm-attnmatch serve`` or vLLM's server module) and its log.

    ``additional_config`` is ``{"attnmatch": section}`` (plus other plugins' keys, if any), or None for a
    server without the plugin's settings (stock vLLM). See :func:`config_args` for how it is passed.
    """

    def __init__(
        self,
        name: str,
        model: Path | str,
        additional_config: dict | None,
        extra_args: list[str] = (),
        extra_env: dict[str, str] | None = None,
        kv_cache_gib: float = 1,
        max_model_len: int = 4096,
        *,
        config_via: str = "flag",
        console_script: bool = False,
        dumps: bool = True,
    ):
        self.name = name
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"attnmatch-{name}-"))
        self.log_path = self.workdir / "server.log"
        self.dump_dir = self.workdir / "dumps"
        self.dump_dir.mkdir()
        args = [
            *launch_command(model, console_script),
            "--served-model-name", "smollm2", "--dtype", "float32",
            "--max-model-len", str(max_model_len), "--port", str(self.port), *extra_args,
            *config_args(additional_config, config_via),
        ]
        self.command = args
        # Debug dumps of every compacted layer feed the tests' parity checks; benchmarks run without them.
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib), **(extra_env or {}))
        if dumps:
            env["VLLM_ATTNMATCH_DUMP_DIR"] = str(self.dump_dir)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._ready = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self) -> "Server":
        deadline = time.time() + STARTUP_TIMEOUT_S
        while not self._ready:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log()[-4000:]}")
            try:
                self._ready = requests.get(self.url + "/health", timeout=2).status_code == 200
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{self.name} server not ready in {STARTUP_TIMEOUT_S}s:\n{self.log()[-4000:]}")
            if not self._ready:
                time.sleep(2)
        return self

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", timeout=600, max_retries=0)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> dict[str, float]:
        """Our ``vllm_attnmatch_*`` samples from ``/metrics``."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            m = re.match(r"^(vllm_attnmatch_\w+?)(?:_total)?\s+([0-9.eE+-]+)$", line)
            if m:
                values[m.group(1).removeprefix("vllm_attnmatch_")] = float(m.group(2))
        return values

    def vllm_metrics(self) -> dict[str, float]:
        """vLLM's own ``vllm:*`` samples, summed over label sets."""
        values: dict[str, float] = {}
        for line in requests.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("vllm:"):
                name, value = line.rsplit(" ", 1)
                name = name.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value)
        return values

    def wait_idle_free_blocks(self, expected: float | None = None, timeout_s: float = 60) -> float:
        """Free-block gauge once no request runs (polled: aborts land a step later)."""
        deadline = time.time() + timeout_s
        value = self.metrics().get("kv_free_blocks", -1)
        while time.time() < deadline and expected is not None and value != expected:
            time.sleep(0.5)
            value = self.metrics().get("kv_free_blocks", -1)
        return value

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def run_mixed_load(plugin: Server, stock: Server, text: str, num_requests: int, max_tokens: int) -> dict:
    """Send ``num_requests`` concurrent mixed requests to ``plugin`` (compacting with several methods,
    plain, compacted-prefix hits, streaming, client aborts) and check them against ``stock``: errors,
    isolation mismatches of the plain ones, and blocks not returned to the pool."""
    import threading

    start_free = plugin.wait_idle_free_blocks()
    kinds = ["plain", "plain-stream", "am", "am-stream-abort", "am-prefix", "am-snapkv", "plain-abort", "am-omp"]
    jobs = []
    for i in range(num_requests):
        kind = kinds[i % len(kinds)]
        offset = (i * 97) % 6000 if kind != "am-prefix" else 0
        prompt = text[offset : offset + 1800]
        xargs = None
        if kind.startswith("am"):
            xargs = {"am_ratio": 0.2}
            if kind == "am-snapkv":
                xargs["am_method"] = "snapkv"
            if kind == "am-omp":
                xargs["am_method"] = "omp"
        jobs.append((i, kind, prompt, xargs))
    expected = {}
    for i, kind, prompt, _ in jobs:
        if kind in ("plain", "plain-stream"):
            expected[i] = stock.client().completions.create(
                model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0
            ).choices[0].text
    results, errors = {}, []

    def run(i, kind, prompt, xargs):
        try:
            client = plugin.client()
            body = {"vllm_xargs": xargs} if xargs else None
            if "stream" in kind or "abort" in kind:
                stream = client.completions.create(
                    model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                    extra_body=body,
                )
                out = ""
                for n, chunk in enumerate(stream):
                    out += chunk.choices[0].text if chunk.choices else ""
                    if "abort" in kind and n == 2:
                        stream.close()
                        break
                results[i] = out
            else:
                results[i] = client.completions.create(
                    model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=body
                ).choices[0].text
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    mismatches = sum(results.get(i) != text_ for i, text_ in expected.items())
    end_free = plugin.wait_idle_free_blocks(expected=start_free)
    return {
        "requests": num_requests,
        "errors": len(errors),
        "error_samples": errors[:5],
        "uncompacted_checked": len(expected),
        "isolation_mismatches": mismatches,
        "leaked_blocks": start_free - end_free,
        "seconds": round(seconds, 1),
    }
