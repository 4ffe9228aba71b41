"""Real vLLM OpenAI servers on the bundled model, shared by the end-to-end tests of one session.

Three servers start together (startup dominates on 2 cores): ``plugin_server`` with the plugin on,
``stock_server`` with the plugin installed but no ``attnmatch`` section, which must behave exactly like
stock vLLM, and ``tiny_pool_server`` (plugin on, a 12-block KV pool) where eviction and preemption
happen, and where synthetic-query requests are fitted on-policy. All use identical engine flags, so their greedy tokens are comparable.

They are launched the ways a user may launch them: ``plugin_server`` with the documented command line
(``vllm-attnmatch serve MODEL --attnmatch default``, the console script), ``tiny_pool_server`` with the
equivalent ``--additional-config '{"attnmatch": ...}'`` form through vLLM's server module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.server import Server
from vllm_attnmatch.model import ensure_model

TEXT_PATH = Path("/usr/share/common-licenses/GPL-3")


PLUGIN_CONFIG = {"attnmatch": {"preset": "default"}}
# The tiny pool also fits synthetic-query requests on-policy (server setting `on_policy`).
TINY_CONFIG = {"attnmatch": {"preset": "default", "on_policy": True}}
# `--attnmatch default`: the bare preset name, exactly as the README writes it.
PLUGIN_FLAG = {"attnmatch": "default"}


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_model()


@pytest.fixture(scope="session")
def _servers(model_dir):
    servers = {
        "plugin": Server(
            "plugin", model_dir, PLUGIN_FLAG, ["--enforce-eager"], {"VLLM_ATTNMATCH_FAULT_INJECTION": "1"},
            console_script=True,
        ),
        "stock": Server("stock", model_dir, None, ["--enforce-eager"]),
        # A pool of 12 blocks (11 usable, 1408 token slots) and 512-token prefill chunks: eviction,
        # preemption and multi-chunk prefills happen on purpose.
        "tiny": Server(
            "tiny", model_dir, TINY_CONFIG,
            ["--enforce-eager", "--num-gpu-blocks-override", "12", "--max-num-batched-tokens", "512"],
            max_model_len=1408, config_via="additional-config",
        ),
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
def tiny_pool_server(_servers) -> Server:
    return _servers["tiny"].wait_ready()


@pytest.fixture(scope="session")
def document() -> str:
    """~650 tokens of real English text (GPL-3 preamble)."""
    return TEXT_PATH.read_text()[:2800]


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def documents_server(model_dir):
    """``--attnmatch documents`` (compact once, ask many); started only when a test asks for it."""
    server = Server("documents", model_dir, {"attnmatch": "documents"}, ["--enforce-eager"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def head_budgets_server(model_dir):
    """Plugin on with the bundled non-uniform head budgets; started only when a test asks for it."""
    config = {"attnmatch": {"preset": "default", "head_budgets": "smollm2-135m"}}
    server = Server("budgets", model_dir, config, ["--enforce-eager"])
    try:
        yield server.wait_ready()
    finally:
        server.stop()
