"""Configuration: the server settings (``--attnmatch PRESET|JSON|PATH``, or equivalently
``--additional-config '{"attnmatch": {...}}'``) and the per-request keys (``vllm_xargs`` →
``SamplingParams.extra_args``).

Why pydantic: every value a user can type is validated in one place, unknown keys are rejected, and
errors name the key and the allowed values. This module must not import vLLM: the scheduler, the
workers, the front end and the tests all parse the same models.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_KEY = "attnmatch"
REQUEST_KEY_PREFIX = "am_"

Method = Literal["highest_attention", "omp", "snapkv", "h2o", "tova", "streaming", "truncate", "random"]
QuerySource = Literal["context", "repeat", "self_study"]
METHOD_NAMES: tuple[str, ...] = Method.__args__  # type: ignore[attr-defined]
QUERY_SOURCES: tuple[str, ...] = QuerySource.__args__  # type: ignore[attr-defined]
PRESETS: tuple[str, ...] = ("default", "fast", "quality", "online", "paper", "documents")

# Bounds that keep a single request from asking for absurd work; generous for real contexts.
MAX_TOKENS_BOUND = 10_000_000
MIN_CHUNK_TOKENS = 16


class ConfigError(ValueError):
    """A user-supplied setting is invalid; ``key`` names it, ``allowed`` says what would be accepted."""

    def __init__(self, key: str, message: str, allowed: str | None = None):
        self.key = key
        self.allowed = allowed
        text = f"{key}: {message}"
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(" ".join(text.split()))  # one line, whatever the message quotes (YAML errors...)


# ------------------------------------------------------------------------------------------------
# Per-request parameters
# ------------------------------------------------------------------------------------------------

#: What each request key accepts, in words; used in every error message about that key.
REQUEST_KEYS_ALLOWED: dict[str, str] = {
    "am_ratio": "a number in (0, 1]",
    "am_target_tokens": f"an integer in [1, {MAX_TOKENS_BOUND}]",
    "am_method": " | ".join(METHOD_NAMES),
    "am_queries": " | ".join(QUERY_SOURCES),
    "am_keep_first": f"an integer in [0, {MAX_TOKENS_BOUND}]",
    "am_keep_last": f"an integer in [0, {MAX_TOKENS_BOUND}]",
    "am_chunk_tokens": f"an integer in [{MIN_CHUNK_TOKENS}, {MAX_TOKENS_BOUND}]",
    "am_max_kv_tokens": f"an integer in [1, {MAX_TOKENS_BOUND}]",
}


class RequestParams(BaseModel):
    """The ``am_*`` keys of one request, exactly as the README's table of per-request keys names them.

    Strict types: HTTP clients send JSON numbers and strings, and a string where a number belongs is
    a client bug worth a 400, not a silent coercion. ``true`` arrives as ``1`` (vLLM's union type)
    and is therefore indistinguishable from the integer 1.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    am_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    am_target_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    am_method: Method | None = None
    am_queries: QuerySource | None = None
    am_keep_first: int | None = Field(default=None, ge=0, le=MAX_TOKENS_BOUND)
    am_keep_last: int | None = Field(default=None, ge=0, le=MAX_TOKENS_BOUND)
    am_chunk_tokens: int | None = Field(default=None, ge=MIN_CHUNK_TOKENS, le=MAX_TOKENS_BOUND)
    am_max_kv_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)

    @model_validator(mode="after")
    def _one_budget(self) -> "RequestParams":
        if self.am_ratio is not None and self.am_target_tokens is not None:
            raise ValueError("am_ratio and am_target_tokens are mutually exclusive")
        return self

    @property
    def is_empty(self) -> bool:
        return not self.model_dump(exclude_none=True)


def _first_error(exc: ValidationError, allowed: Mapping[str, str]) -> ConfigError:
    """Turn pydantic's error list into one ConfigError naming the (first) offending key."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    key = loc[0] if loc else ""
    if err["type"] == "extra_forbidden":
        return ConfigError(key, "unknown key", "one of " + ", ".join(sorted(allowed)))
    if not key:  # model-level validator (mutually exclusive keys)
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        first = msg.split(" ", 1)[0]
        return ConfigError(first, msg, "set only one of them")
    value = err.get("input")
    return ConfigError(".".join(loc), f"invalid value {value!r}: {err['msg']}", allowed.get(key))


def request_keys(extra_args: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``am_*`` subset of a request's extra_args (other plugins' keys are not ours to judge)."""
    if not extra_args:
        return {}
    return {k: v for k, v in extra_args.items() if isinstance(k, str) and k.startswith(REQUEST_KEY_PREFIX)}


def parse_request_params(extra_args: Mapping[str, Any] | None) -> RequestParams:
    """Validate a request's ``am_*`` keys; raise ConfigError naming the key on the first problem."""
    keys = request_keys(extra_args)
    for key, value in keys.items():
        # pydantic's allow_inf_nan does not cover every path (e.g. an int field given nan); check once.
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(key, f"invalid value {value!r}: must be finite", REQUEST_KEYS_ALLOWED.get(key))
    try:
        return RequestParams.model_validate(keys)
    except ValidationError as exc:
        raise _first_error(exc, REQUEST_KEYS_ALLOWED) from None


# ------------------------------------------------------------------------------------------------
# Server settings
# ------------------------------------------------------------------------------------------------

AlgorithmOption = float | int | str | bool | None | list[float]  # lists: e.g. beta_ridges, beta_bounds
#: Option names the engine sets itself on every compaction call (per layer); a user value would be
#: overridden or collide.
ENGINE_SET_OPTIONS = frozenset({"bias", "scale", "query_positions", "key_positions"})


class ServerConfig(BaseModel):
    """Settings of the ``attnmatch`` section (``--attnmatch`` or ``--additional-config``).

    Defaults for per-request keys live here under the same names without the ``am_`` prefix; a request
    overrides them key by key. ``ratio`` and ``target_tokens`` both unset means requests without
    ``am_*`` keys are served uncompacted.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    preset: str | None = Field(default=None, description="preset name in configs/ or a YAML path")
    ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    target_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    method: Method = "highest_attention"
    queries: QuerySource = "context"
    keep_first: int = Field(default=0, ge=0, le=MAX_TOKENS_BOUND)
    keep_last: int = Field(default=0, ge=0, le=MAX_TOKENS_BOUND)
    chunk_tokens: int | None = Field(default=None, ge=MIN_CHUNK_TOKENS, le=MAX_TOKENS_BOUND)
    # Online mode (compaction at a memory ceiling during decode).
    max_kv_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_BOUND)
    online_ratio: float = Field(default=0.5, gt=0.0, lt=1.0)
    online_recent_tokens: int = Field(default=64, ge=0, le=MAX_TOKENS_BOUND)
    online_max_compactions: int | None = Field(default=None, ge=1)
    # Newest captured queries (prefill and decode) an online request keeps for its re-compactions.
    online_query_tokens: int = Field(default=1024, ge=1, le=MAX_TOKENS_BOUND)
    # Reference queries and limits.
    max_query_tokens: int = Field(default=4096, ge=1, le=MAX_TOKENS_BOUND)
    # Memory (MiB, per device) for the reference queries captured from prefills and online rings, held
    # outside vLLM's KV pool until their compaction ends. The scheduler reserves each compacting request's
    # worst case (its capture rows x layers x query heads x head size) when its capture starts; one that
    # does not fit is served uncompacted, its report saying "capture budget ... MiB exhausted". None: room
    # for 4 concurrent captures of min(max_query_tokens, max_model_len) rows (logged at start-up).
    capture_budget_mib: float | None = Field(default=None, gt=0.0, le=float(1 << 24))
    # Other sources mixed into the one a request picks, with a cap in query rows each (e.g. am_queries
    # "repeat" with {"context": 1024} adds up to 1024 of the prefill's own queries). Empty: one source.
    query_mix: dict[QuerySource, Annotated[int, Field(ge=0, le=MAX_TOKENS_BOUND)]] = Field(
        default_factory=dict, description="a mapping context | repeat | self_study -> query rows (>= 0)"
    )
    # Non-uniform per-head budgets (see engine/head_budgets.py): a bundled share file name or a path, read
    # once in the front end (resolve_section) and passed to the engine as the share table itself,
    # {"L<layer>H<head>": share}, so no engine process reads a file or depends on its working directory.
    head_budgets: str | dict[str, float] | None = Field(
        default=None, description='a name in configs/head_budgets/, a JSON path, or {"L<layer>H<head>": share}'
    )
    head_budget_max_factor: float = Field(default=2.0, ge=1.0, le=64.0)
    # Bounds of the synthetic sources (see worker/query_sources.py).
    repeat_max_tokens: int = Field(default=2048, ge=1, le=MAX_TOKENS_BOUND)
    self_study_tokens: int = Field(default=48, ge=1, le=4096)
    self_study_seconds: float = Field(default=30.0, gt=0.0, le=3600.0)
    # Self-study prompt family (worker/query_sources.PROMPT_FAMILIES): tasks | continue | mixed. "continue"
    # won on the DEV texts (benchmarks/results/query_levers_dev.md).
    self_study_prompts: Literal["tasks", "continue", "mixed"] = Field(default="continue", description="tasks | continue | mixed")
    # With a synthetic source (repeat / self_study): fit layer l on the queries its tokens produce through
    # layers < l already compacted, all layers in ONE teacher-forced pass (algorithms/on_policy.py), instead
    # of on queries of the full cache. Lower KL on the DEV texts, at the cost of that pass.
    on_policy: bool = False
    min_prompt_tokens: int = Field(default=32, ge=1, le=MAX_TOKENS_BOUND)
    # Share of the KV pool (0 to 1) whose blocks may hold *pinned* compacted prefixes: the most recently
    # used ones, reused only after every other free block (they still count as free, so a pin never
    # refuses or preempts a request). Past it the least recently used prefix goes back to plain LRU
    # order beside raw cached blocks. 0.5: a compacted block replaces ~1/ratio raw ones plus a prefill
    # and a compaction, yet half the pool stays ordinary prefix cache for requests without am_* keys.
    prefix_pin_share: float = Field(default=0.5, ge=0.0, le=1.0)
    # Compactions run over several engine steps, in layer slices, so that they never freeze the batch.
    # One budget per step for ALL compactions in flight together: while other requests are scheduled, this
    # many layers per step in total, handed to the jobs oldest first (each job runs as many of them as it
    # has left, the next job the rest; every job becomes the oldest in turn, so none starves).
    # None: every layer of every job in one step (the batch waits for the whole compaction).
    compaction_layers_per_step: int | None = Field(default=1, ge=1, le=4096)
    # The step's budget when nothing else is scheduled (an idle batch): more layers than while busy, yet
    # a bounded chunk, so a request that arrives meanwhile is scheduled at the next step instead of
    # after the whole job (the default 8: about a quarter of a 30-layer model's compaction per step, so a
    # newcomer waits at most that). Never below compaction_layers_per_step. Also the budget of a busy step
    # when the next waiting request needs more blocks than are free: jobs free their raw blocks only when
    # done, so under memory pressure finishing them sooner is what admits the waiting.
    idle_layers_per_step: int = Field(default=8, ge=1, le=4096)
    # Options forwarded to algorithms.compact(); names are the algorithm's. A plain key applies to every
    # method (e.g. {"max_queries": 512}); a method's own options go in its section, used only when a
    # request runs that method (e.g. {"highest_attention": {"reduction": "rms"}, "snapkv": {"window": 64}}).
    # Checked at start-up by a dry run of every method (vllm_attnmatch/frontend/option_check.py).
    algorithm: dict[str, AlgorithmOption | dict[str, AlgorithmOption]] = Field(
        default_factory=dict,
        description="options of every method, and per-method sections <method>: {option: value}",
    )
    log_compactions: bool = True

    @field_validator("head_budgets", mode="before")
    @classmethod
    def _head_budgets_exist(cls, value: Any) -> Any:
        if isinstance(value, str):
            head_budget_path(value)  # refuse a missing share file at start-up, not in the engine
            return value
        if isinstance(value, Mapping):
            return head_shares_table(value)
        if value is None:
            return None
        raise ValueError(f"must be a name, a path or a share table, got {type(value).__name__}")

    @model_validator(mode="after")
    def _one_budget(self) -> "ServerConfig":
        if self.ratio is not None and self.target_tokens is not None:
            raise ValueError("ratio and target_tokens are mutually exclusive")
        return self

    def algorithm_options(self, method: str) -> dict[str, AlgorithmOption]:
        """The options a compaction with ``method`` gets: the shared ones, then the method's section."""
        shared = {k: v for k, v in self.algorithm.items() if not isinstance(v, Mapping)}
        section = self.algorithm.get(method)
        return {**shared, **(dict(section) if isinstance(section, Mapping) else {})}

    def summary(self) -> str:
        """One line with the effective settings, for the per-process start-up log line."""
        settings = self.model_dump(exclude={"preset"})
        if isinstance(self.head_budgets, dict):  # the table's digest: a log line, and different shares differ
            table = json.dumps(self.head_budgets, sort_keys=True).encode()
            settings["head_budgets"] = f"{len(self.head_budgets)} shares sha256:{hashlib.sha256(table).hexdigest()[:16]}"
        return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def _allowed(field) -> str:
    """What a server setting accepts, in words: its description, else its type and bounds."""
    if field.description:
        return field.description
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = [f"{symbols[name]} {getattr(m, name)}" for m in field.metadata for name in symbols if hasattr(m, name)]
    annotation = field.annotation
    if get_origin(annotation) is Literal:
        kind = " | ".join(map(str, get_args(annotation)))
    else:
        kind = annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")
    return kind + (", " + " and ".join(bounds) if bounds else "")


SERVER_KEYS_ALLOWED: dict[str, str] = {name: _allowed(field) for name, field in ServerConfig.model_fields.items()}


def head_budget_path(name_or_path: str) -> Path:
    """A bundled per-head share file (``configs/head_budgets/<name>.json``) or a path to one."""
    bundled = Path(str(resources.files("vllm_attnmatch.configs").joinpath("head_budgets", f"{name_or_path}.json")))
    if bundled.is_file():
        return bundled
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"no bundled share file or path {name_or_path!r}")
    return path


_HEAD_KEY = re.compile(r"L(\d+)H(\d+)")


def head_shares_table(data: Any) -> dict[str, float]:
    """A share table in the authors' schema, checked: ``{"L<layer>H<head>": share >= 0}``, not empty."""
    if not isinstance(data, Mapping) or not data:
        raise ValueError('a share table must be a non-empty mapping {"L<layer>H<head>": share}')
    table = {}
    for key, share in data.items():
        if not isinstance(key, str) or not _HEAD_KEY.fullmatch(key):
            raise ValueError(f"bad head-budget key {key!r}; expected 'L<layer>H<head>'")
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not math.isfinite(share) or share < 0:
            raise ValueError(f"share of {key} must be a finite number >= 0, got {share!r}")
        table[key] = float(share)
    return table


def read_head_budgets(name_or_path: str) -> dict[str, float]:
    """The share table of a bundled name or a file, read now (in the front end); errors name the key."""
    key = f"{CONFIG_KEY}.head_budgets"
    try:
        path = head_budget_path(name_or_path)
        return head_shares_table(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError(key, f"{name_or_path!r}: {exc}", SERVER_KEYS_ALLOWED["head_budgets"]) from None


def preset_path(name_or_path: str) -> Path:
    """Resolve a preset: a bundled name (default, fast, quality, online) or a path to a YAML file."""
    if name_or_path in PRESETS:
        return Path(str(resources.files("vllm_attnmatch.configs").joinpath(f"{name_or_path}.yaml")))
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{CONFIG_KEY}.preset", f"no preset or file named {name_or_path!r}", " | ".join(PRESETS) + " | a YAML path"
        )
    return path


def load_preset(name_or_path: str) -> dict[str, Any]:
    path = preset_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{CONFIG_KEY}.preset", f"{name_or_path!r} cannot be read as YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_KEY}.preset", f"{name_or_path!r} is not a YAML mapping")
    if "preset" in data:
        raise ConfigError(f"{CONFIG_KEY}.preset", f"{name_or_path!r} may not name another preset")
    return data


def _merged_section(section: Any) -> dict[str, Any]:
    """The section as a dict (a JSON string or a preset name accepted), its preset's keys first, inline
    keys over them."""
    if isinstance(section, str):
        stripped = section.strip()
        try:
            section = json.loads(stripped) if stripped.startswith("{") else {"preset": stripped}
        except json.JSONDecodeError as exc:
            raise ConfigError(CONFIG_KEY, f"invalid JSON: {exc}") from None
    if section is None:
        section = {}
    if not isinstance(section, Mapping):
        raise ConfigError(CONFIG_KEY, f"must be a JSON object, got {type(section).__name__}")
    merged: dict[str, Any] = {}
    if section.get("preset"):
        merged.update(load_preset(str(section["preset"])))
    merged.update(section)
    return merged


def _validated(merged: Mapping[str, Any]) -> ServerConfig:
    try:
        config = ServerConfig.model_validate(merged)
    except ValidationError as exc:
        err = _first_error(exc, SERVER_KEYS_ALLOWED)
        raise ConfigError(f"{CONFIG_KEY}.{err.key}", str(err).split(": ", 1)[1]) from None
    _check_algorithm_layout(config.algorithm)
    return config


def parse_server_config(section: Any) -> ServerConfig:
    """Validate the ``attnmatch`` section (a dict, a JSON string, or a preset name); preset first,
    inline keys override it. A resolved section (:func:`resolve_section`) reads no file."""
    return _validated(_merged_section(section))


def resolve_section(section: Any) -> dict[str, Any]:
    """The ``attnmatch`` section by content, resolved once in the front end: the preset's keys merged in
    (inline keys over them, no ``preset`` left) and a ``head_budgets`` name or path replaced by its share
    table. The result is validated and plain JSON, and parses to the same settings in any process and
    any working directory without reading a file (EngineCore and the workers get it inside the
    ``VllmConfig``). Resolving a resolved section changes nothing. Errors name the key."""
    merged = _merged_section(section)
    config = _validated(merged)
    resolved = {key: value for key, value in merged.items() if key != "preset"}
    if isinstance(config.head_budgets, str):
        resolved["head_budgets"] = read_head_budgets(config.head_budgets)
    elif config.head_budgets is not None:
        resolved["head_budgets"] = config.head_budgets
    return resolved


def _check_algorithm_layout(algorithm: Mapping[str, Any]) -> None:
    """The shape of ``algorithm``: sections only under method names, no option the engine sets itself.
    Whether the values work is checked at start-up by a dry run (frontend.option_check.check_algorithm_options)."""
    for name, value in algorithm.items():
        key = f"{CONFIG_KEY}.algorithm.{name}"
        if isinstance(value, Mapping):
            if name not in METHOD_NAMES:
                raise ConfigError(key, "a section of options for an unknown method", " | ".join(METHOD_NAMES))
            options = value
            key_prefix = key
        elif name in METHOD_NAMES:
            raise ConfigError(key, f"a method's section must be a mapping of options, got {value!r}")
        else:
            options, key_prefix = {name: value}, f"{CONFIG_KEY}.algorithm"
        for option in options:
            if option in ENGINE_SET_OPTIONS:
                raise ConfigError(
                    f"{key_prefix}.{option}", "is set by the engine on every compaction",
                    "any other option of the method; not " + ", ".join(sorted(ENGINE_SET_OPTIONS)),
                )


def server_config_from(additional_config: Any) -> ServerConfig | None:
    """The plugin's settings from vLLM's ``additional_config``, or None when the plugin is off."""
    if not isinstance(additional_config, Mapping) or CONFIG_KEY not in additional_config:
        return None
    return parse_server_config(additional_config[CONFIG_KEY])


# ------------------------------------------------------------------------------------------------
# Effective per-request settings
# ------------------------------------------------------------------------------------------------


class EffectiveParams(BaseModel):
    """What the engine does for one request: server defaults overridden key by key by the request."""

    model_config = ConfigDict(frozen=True)

    ratio: float | None
    target_tokens: int | None
    method: Method
    queries: QuerySource
    keep_first: int
    keep_last: int
    chunk_tokens: int | None
    max_kv_tokens: int | None

    @property
    def compacts_prefill(self) -> bool:
        """Compact right after the prefill (a budget is set)."""
        return self.ratio is not None or self.target_tokens is not None

    def cache_key(self) -> str:
        """Every parameter that changes a compaction's result (for the compacted-prefix store)."""
        return json.dumps(self.model_dump(exclude={"max_kv_tokens"}), sort_keys=True, separators=(",", ":"))


def effective_params(server: ServerConfig, request: RequestParams) -> EffectiveParams:
    """Merge a request's keys over the server defaults. A request budget replaces both server budgets."""
    has_budget = request.am_ratio is not None or request.am_target_tokens is not None
    ratio = request.am_ratio if has_budget else server.ratio
    target = request.am_target_tokens if has_budget else server.target_tokens

    def pick(request_value, server_value):
        return server_value if request_value is None else request_value

    return EffectiveParams(
        ratio=ratio,
        target_tokens=target,
        method=pick(request.am_method, server.method),
        queries=pick(request.am_queries, server.queries),
        keep_first=pick(request.am_keep_first, server.keep_first),
        keep_last=pick(request.am_keep_last, server.keep_last),
        chunk_tokens=pick(request.am_chunk_tokens, server.chunk_tokens),
        max_kv_tokens=pick(request.am_max_kv_tokens, server.max_kv_tokens),
    )
