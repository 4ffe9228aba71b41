"""The ``--attnmatch PRESET|JSON|PATH`` flag of ``vllm serve`` (and every vLLM command built on
``AsyncEngineArgs``).

How it gets there: ``AsyncEngineArgs.add_cli_args`` calls ``load_general_plugins()`` first — expressly so a
plugin may update the parser — and only then ``EngineArgs.add_cli_args(parser)``. Our ``register()``
therefore wraps ``EngineArgs.add_cli_args`` to add the flag (in its own help group, ``--help=attnmatch``).
``EngineArgs.from_cli_args`` copies dataclass fields only, so it is wrapped too: the flag's value becomes
``additional_config["attnmatch"]``, exactly what ``--additional-config '{"attnmatch": ...}'`` gives (that
form keeps working, and is the only one for ``LLM(...)``). Giving both is an error.

The value is checked while the command line is parsed (settings, presets, files, and a dry run of the
``algorithm`` options), so a bad value stops the command with one argparse message naming the key, and
resolved there by content (the preset's keys merged in, a ``head_budgets`` file replaced by its share
table): EngineCore and the workers never read a file or depend on the working directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from vllm_attnmatch.config import CONFIG_KEY, PRESETS, ConfigError, parse_server_config, resolve_section

FLAG = "--attnmatch"
DEST = "attnmatch"
GROUP_TITLE = "AttnMatch"
_HOOK_MARKER = "_attnmatch_flag"

GROUP_DESCRIPTION = (
    "Attention Matching KV-cache compaction (the vllm-attnmatch plugin): --attnmatch PRESET|JSON|PATH; "
    "details with --help=attnmatch."
)

HELP = f"""Turn on Attention Matching KV-cache compaction and set its server defaults. The value is one of:
- a preset name: {" | ".join(PRESETS)};
- an inline JSON object of settings, e.g. '{{"preset": "default", "ratio": 0.1}}' (inline keys override the preset's);
- a path to a YAML or JSON file holding such an object.

Requests then opt in with vllm_xargs keys (am_ratio, am_target_tokens, am_method, ...) unless the
settings set a ratio or target_tokens for every request.
Equivalent to --additional-config '{{"{CONFIG_KEY}": ...}}'; give only one of the two. Not set: the server is stock vLLM."""

ALLOWED = " | ".join(PRESETS) + " | an inline JSON object | a path to a YAML/JSON file"


def section_from_flag(value: str) -> dict[str, Any]:
    """The ``attnmatch`` section a flag value stands for (not yet validated).

    A file's contents are read here, in the process that parses the command line, so the engine
    processes get the settings themselves and never depend on the file or the working directory.
    """
    text = value.strip()
    if text.startswith("{"):
        try:
            section = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(CONFIG_KEY, f"invalid JSON {value!r}: {exc}", ALLOWED) from None
    elif text in PRESETS:
        return {"preset": text}
    elif _is_file(text):
        path = Path(text).expanduser()
        try:
            section = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(CONFIG_KEY, f"{str(path)!r} is not readable YAML/JSON: {exc}", ALLOWED) from None
    else:
        raise ConfigError(CONFIG_KEY, f"no preset or file named {_short(value)!r}", ALLOWED)
    if not isinstance(section, dict):
        raise ConfigError(CONFIG_KEY, f"{value!r} must hold a mapping of settings, got {type(section).__name__}", ALLOWED)
    return section


def _is_file(text: str) -> bool:
    try:
        return Path(text).expanduser().is_file()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte, ...
        return False


def _short(value: str, limit: int = 200) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def validated_section(value: str) -> dict[str, Any]:
    """The flag's section resolved by content (``config.resolve_section``: preset and share files read
    here, in the process that parses the command line) after every start-up check that needs no model;
    raises ConfigError naming the key."""
    from vllm_attnmatch.frontend.option_check import check_algorithm_options

    section = resolve_section(section_from_flag(value))
    check_algorithm_options(parse_server_config(section))
    return section


def _flag_type(value: str) -> dict[str, Any]:
    """argparse ``type=``: argparse prints an ArgumentTypeError's text as the command's one error line.
    Every error becomes that line naming a key: a ConfigError names its own, anything else (a bug or an
    unforeseen failure of the checks) names the flag's section."""
    try:
        return validated_section(value)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        raise argparse.ArgumentTypeError(str(ConfigError(CONFIG_KEY, f"{type(exc).__name__}: {exc}"))) from None


def add_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--attnmatch`` in its own help group (idempotent per parser)."""
    if FLAG in getattr(parser, "_option_string_actions", {}):
        return parser
    group = parser.add_argument_group(title=GROUP_TITLE, description=GROUP_DESCRIPTION)
    group.add_argument(FLAG, dest=DEST, type=_flag_type, default=None, metavar="PRESET|JSON|PATH", help=HELP)
    return parser


def merge_into_engine_args(engine_args: Any, section: dict[str, Any] | None) -> Any:
    """Put the flag's section into ``engine_args.additional_config`` (a new dict: the parsed namespace's
    own value is left untouched, so building EngineArgs from it twice gives the same result)."""
    if section is None:
        return engine_args
    additional = engine_args.additional_config or {}
    if CONFIG_KEY in additional:
        raise ConfigError(
            CONFIG_KEY,
            f"given twice, by {FLAG} and inside --additional-config",
            f"one of {FLAG} PRESET|JSON|PATH or --additional-config '{{\"{CONFIG_KEY}\": ...}}'",
        )
    engine_args.additional_config = {**additional, CONFIG_KEY: section}
    return engine_args


def install_cli_flag() -> None:
    """Wrap ``EngineArgs.add_cli_args`` and ``EngineArgs.from_cli_args`` once per process."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.add_cli_args, _HOOK_MARKER, False):
        return
    original_add = EngineArgs.add_cli_args  # a staticmethod, seen as a plain function
    original_from = EngineArgs.__dict__["from_cli_args"].__func__  # a classmethod's function

    def add_cli_args(parser, *args, **kwargs):
        return add_flag(original_add(parser, *args, **kwargs))

    def from_cli_args(cls, args: argparse.Namespace):
        return merge_into_engine_args(original_from(cls, args), getattr(args, DEST, None))

    for wrapper, original in ((add_cli_args, original_add), (from_cli_args, original_from)):
        setattr(wrapper, _HOOK_MARKER, True)
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__doc__ = original.__doc__
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
