"""Real vLLM OpenAI servers on the bundled model, shared by the end-to-end tests of one session.

Two servers start together (startup dominates on 2 cores): ``plugin_server`` with the plugin on, and
``stock_server`` with the plugin installed but no ``attnmatch`` section, which must behave exactly like
stock vLLM. Both use identical engine flags, so their greedy tokens are comparable.
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

import pytest
import requests

from vllm_attnmatch.model import ensure_model

STARTUP_TIMEOUT_S = 900
TEXT_PATH = Path("/usr/share/common-licenses/GPL-3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``python -m vllm.entrypoints.openai.api_server`` process and its log."""

    def __init__(self, name: str, model: Path, additional_config: dict | None, extra_env: dict[str, str]):
        self.name = name
        self.port = _free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"attnmatch-{name}-"))
        self.log_path = self.workdir / "server.log"
        self.dump_dir = self.workdir / "dumps"
        self.dump_dir.mkdir()
        args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", "smollm2", "--dtype", "float32",
            "--max-model-len", "4096", "--port", str(self.port), "--enforce-eager",
        ]
        if additional_config is not None:
            args += ["--additional-config", json.dumps(additional_config)]
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_ATTNMATCH_DUMP_DIR=str(self.dump_dir), **extra_env)
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


PLUGIN_CONFIG = {"attnmatch": {"preset": "default"}}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_model()


@pytest.fixture(scope="session")
def _servers(model_dir):
    servers = {
        "plugin": Server("plugin", model_dir, PLUGIN_CONFIG, {}),
        "stock": Server("stock", model_dir, None, {}),
    }
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def plugin_server(_servers) -> Server:
    return _servers["plugin"].wait_ready()


@pytest.fixture(scope="session")
def stock_server(_servers) -> Server:
    return _servers["stock"].wait_ready()


@pytest.fixture(scope="session")
def document() -> str:
    """~650 tokens of real English text (GPL-3 preamble)."""
    return TEXT_PATH.read_text()[:2800]


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
