"""The README's serve command, exactly: ``bash scripts/serve.sh`` — ``vllm-attnmatch serve … --attnmatch
default`` with vLLM's default compilation (no ``--enforce-eager``, unlike every other test server) — serves a
compacting request and a plain one, and the compacting request's report says it was compacted."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from harness.server import STARTUP_TIMEOUT_S, free_port

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served():
    """``scripts/serve.sh --port P`` as a user starts it (a 1 GiB KV cache to fit beside the other servers)."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="attnmatch-serve-sh-")) / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["bash", "scripts/serve.sh", "--port", str(port), "--max-model-len", "2048"],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1"),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"scripts/serve.sh exited:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"scripts/serve.sh not ready in {STARTUP_TIMEOUT_S}s:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(2)
        yield url, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_script_runs_without_enforce_eager(served):
    _, log = served
    assert "--enforce-eager" not in (ROOT / "scripts" / "serve.sh").read_text()
    text = log.read_text(errors="replace")
    assert "vllm-attnmatch" in text and "enforce_eager=False" in text and "enforce_eager=True" not in text


def test_serve_script_compacts_a_request_with_am_ratio_and_serves_a_plain_one(served, document):
    import openai
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=600, max_retries=0)
    compacted = client.completions.create(
        model="smollm2", prompt=document, max_tokens=8, temperature=0, extra_body={"vllm_xargs": {"am_ratio": 0.1}}
    )
    plain = client.completions.create(model="smollm2", prompt=document, max_tokens=8, temperature=0)
    assert compacted.choices[0].text and plain.choices[0].text
    report = client.get(f"/attnmatch/requests/{compacted.id}", cast_to=object)["data"][0]
    assert report["status"] == "compacted" and report["tokens_after"] < report["tokens_before"], report
    with pytest.raises(openai.NotFoundError):  # a request that did not ask for compaction has no report
        client.get(f"/attnmatch/requests/{plain.id}", cast_to=object)
