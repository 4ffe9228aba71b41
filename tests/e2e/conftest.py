"""Real vLLM OpenAI servers on the bundled model, shared by the end-to-end tests of one session.

Two servers start together (startup dominates on 2 cores): ``plugin_server`` with the plugin on, and
``stock_server`` with the plugin installed but no ``attnmatch`` section, which must behave exactly like
stock vLLM. Both use identical engine flags, so their greedy tokens are comparable.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vllm_attnmatch.launch import Server
from vllm_attnmatch.model import ensure_model

TEXT_PATH = Path("/usr/share/common-licenses/GPL-3")


PLUGIN_CONFIG = {"attnmatch": {"preset": "default"}}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_model()


@pytest.fixture(scope="session")
def _servers(model_dir):
    servers = {
        "plugin": Server("plugin", model_dir, PLUGIN_CONFIG, ["--enforce-eager"]),
        "stock": Server("stock", model_dir, None, ["--enforce-eager"]),
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
