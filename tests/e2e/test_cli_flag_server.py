"""The plugin's command line on a real server: ``vllm-attnmatch serve MODEL --attnmatch ...`` (the
console script and the flag), the equivalent ``--additional-config`` form, and start-up refusals."""

from __future__ import annotations

import re
import time

import pytest

from harness.server import CONSOLE_SCRIPT, Server

pytestmark = pytest.mark.server

ENABLED = re.compile(r"\(APIServer pid=\d+\).*vllm-attnmatch \S+ enabled \(api server")


def _wait_for(server: Server, name: str, above: float, timeout_s: float = 60) -> float:
    """A ``vllm_attnmatch_*`` counter once it exceeds ``above`` (EngineCore publishes it a step later)."""
    deadline = time.time() + timeout_s
    value = server.metrics().get(name, 0.0)
    while value <= above and time.time() < deadline:
        time.sleep(0.5)
        value = server.metrics().get(name, 0.0)
    return value


def test_documented_command_serves_and_compacts_a_request_with_am_ratio(plugin_server, model_dir, document):
    # The session's plugin server is started exactly as the README says (plus test-only engine flags).
    command = plugin_server.command
    assert command[:3] == [str(CONSOLE_SCRIPT), "serve", str(model_dir)]
    assert command[command.index("--attnmatch") + 1] == "default"
    assert "--additional-config" not in command
    assert ENABLED.search(plugin_server.log())

    before = plugin_server.metrics()
    # A prompt no other test sends: its compaction cannot be a compacted-prefix hit.
    prompt = "The following text is read by the command-line test.\n\n" + document
    reply = plugin_server.client().completions.create(
        model="smollm2", prompt=prompt, max_tokens=8, temperature=0, extra_body={"vllm_xargs": {"am_ratio": 0.2}}
    )
    assert reply.choices[0].text
    assert _wait_for(plugin_server, "compactions", before["compactions"]) == before["compactions"] + 1
    after = plugin_server.metrics()
    assert 0 < after["tokens_after"] - before["tokens_after"] < after["tokens_before"] - before["tokens_before"]
    assert after["failures"] == before["failures"]


def test_additional_config_form_turns_the_same_plugin_on(tiny_pool_server):
    command = tiny_pool_server.command
    assert "--attnmatch" not in command
    assert '"attnmatch"' in command[command.index("--additional-config") + 1]
    assert ENABLED.search(tiny_pool_server.log())


def _refused(model_dir, name: str, additional_config: dict, extra_args: list[str] = (), **kwargs) -> str:
    """Start a server that must refuse to start; return its log."""
    server = Server(name, model_dir, additional_config, ["--enforce-eager", *extra_args], **kwargs)
    try:
        assert server.proc.wait(timeout=600) != 0
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "(EngineCore" not in log, "refused only after the engine started"
    return log


def test_bad_algorithm_option_in_the_flag_stops_the_command_naming_the_key(model_dir):
    log = _refused(model_dir, "bad-flag", {"attnmatch": {"algorithm": {"score": "rms"}}}, console_script=True)
    assert re.search(
        r"vllm-attnmatch serve: error: argument --attnmatch: attnmatch\.algorithm\.score: .*'highest_attention'", log
    ), log[-2000:]


def test_bad_algorithm_option_in_additional_config_stops_the_server_naming_key_and_method(model_dir):
    # highest_attention's own option as a plain key would fail every request that picks omp.
    log = _refused(
        model_dir, "bad-option", {"attnmatch": {"algorithm": {"reduction": "rms"}}}, config_via="additional-config"
    )
    assert re.search(r"ConfigError: attnmatch\.algorithm\.reduction: .*'omp'.*allowed", log), log[-2000:]


def test_flag_and_additional_config_section_together_are_refused_naming_both(model_dir):
    log = _refused(
        model_dir, "both", {"attnmatch": "default"}, ["--additional-config", '{"attnmatch": {"preset": "fast"}}'],
        console_script=True,
    )
    assert re.search(r"ConfigError: attnmatch: given twice, by --attnmatch and inside --additional-config", log), log[-2000:]
