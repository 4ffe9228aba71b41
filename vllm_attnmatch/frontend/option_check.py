"""Start-up dry run of the ``algorithm`` options against every method a request may pick.

Why a dry run rather than a schema: which options a method accepts, and which values make it fail, is
decided by the algorithm code (method dataclass fields, :class:`FitConfig`, general options of
``compact()``) and changes with it. Running the worker's own per-layer entry points
(``worker.executor.compact_layer`` / ``compact_layer_online``) on random tensors of the served model's
attention shapes (a few hundred tokens; :class:`CheckShape`), once per method and
per call path (uniform, chunked, per-head budgets, online re-compaction), asks exactly the code that will
run later. A request's ``am_method`` can then never meet options that make its compaction fail.

Runs only when ``algorithm`` options are set, in the front-end process before the engine starts: while
the ``--attnmatch`` flag is parsed (a default shape) and again once the model's shapes are known (the
engine-config hook). Runs in a thread of its own with one torch thread: the caller's torch thread count
is never changed. Must not import vLLM.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

import torch

from vllm_attnmatch.config import CONFIG_KEY, METHOD_NAMES, MIN_CHUNK_TOKENS, ConfigError, ServerConfig

@dataclass(frozen=True)
class CheckShape:
    """The shapes of the dry run's compactions: one layer's KV heads, query heads and head size as a worker
    sees them (one tensor-parallel rank's), and a context of a few hundred tokens, so that the options meet
    the sizes they will meet in service (a budget, a window or a tile that only breaks at a real head count
    or length is caught here). Every branch a real compaction takes is exercised: grouped queries, raw
    sinks, a span several chunks long, causal query positions, and a budget large enough that keys are
    chosen by score after the protected sinks and recent window."""

    kv_heads: int = 2
    query_heads: int = 8
    head_dim: int = 64
    tokens: int = 384
    keep_first: int = 4

    @property
    def span_end(self) -> int:
        return self.tokens - 28  # a raw tail after the span

    @property
    def target(self) -> int:
        return max(1, (self.span_end - self.keep_first) // 4)

    @classmethod
    def of_model(cls, kv_heads: int, query_heads: int, head_dim: int, max_model_len: int) -> "CheckShape":
        """The served model's per-rank attention shapes over ``min(384, max_model_len)`` tokens."""
        return cls(kv_heads=max(1, kv_heads), query_heads=max(1, query_heads), head_dim=head_dim,
                   tokens=max(64, min(cls.tokens, max_model_len)))


#: Before the model is known (the ``--attnmatch`` flag is checked while the command line is parsed): a
#: small grouped-query model's layer.
DEFAULT_SHAPE = CheckShape()
_ONLINE_QUERIES = 8


def _cases(method: str, options: dict[str, Any], shape: CheckShape) -> Iterator[tuple[str, Any]]:
    """(call path, thunk) pairs: each thunk runs one engine-shaped compaction and raises on failure."""
    from vllm_attnmatch.contract.jobs import CompactionJob, CompactionLayout
    from vllm_attnmatch.worker.executor import compact_layer, compact_layer_online

    gen = torch.Generator().manual_seed(0)
    kv, tokens, dim = shape.kv_heads, shape.tokens, shape.head_dim
    keys = torch.randn(kv, tokens, dim, generator=gen)
    values = torch.randn(kv, tokens, dim, generator=gen)
    queries = torch.randn(tokens, shape.query_heads, dim, generator=gen)
    positions = torch.arange(tokens)
    scale = dim**-0.5
    target = shape.target
    layout = CompactionLayout(num_tokens=tokens, keep_first=shape.keep_first, span_end=shape.span_end, target=target)

    def job(**kwargs) -> CompactionJob:
        fields = dict(req_id="option-check", layout=layout, src_block_ids=(), dst_block_ids=(), method=method,
                      queries="context", chunk_tokens=None, options=dict(options))
        fields.update(kwargs)
        return CompactionJob(**fields)

    yield "prefill", lambda: compact_layer(job(), keys, values, queries, positions, scale)
    yield "chunked (am_chunk_tokens)", lambda: compact_layer(
        job(chunk_tokens=MIN_CHUNK_TOKENS), keys, values, queries, positions, scale
    )
    head_targets = (tuple(target if h % 2 else max(1, target // 2) for h in range(kv)),)
    yield "per-head budgets (head_budgets)", lambda: compact_layer(
        job(head_targets=head_targets), keys, values, queries, positions, scale, layer_index=0
    )
    # Online: the source already holds compacted entries with β and −inf padding; decode queries.
    beta = 0.1 * torch.randn(kv, tokens, generator=gen)
    beta[:, shape.span_end - 2 : shape.span_end] = float("-inf")
    online = CompactionLayout(num_tokens=tokens, keep_first=shape.keep_first, span_end=shape.span_end,
                              target=min(shape.span_end - shape.keep_first - 1, target * 2), online=True)
    decode_queries = queries[-_ONLINE_QUERIES:]
    yield "online (max_kv_tokens)", lambda: compact_layer_online(
        job(layout=online), keys, values, beta, decode_queries, scale
    )


def _failure(method: str, options: dict[str, Any], shape: CheckShape) -> str | None:
    """Why a compaction with these options fails on some call path, or None when every path works."""
    for path, run in _cases(method, options, shape):
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - any failure here would fail the real compaction
            return f"{path}: {type(exc).__name__}: {exc}"
    return None


def check_algorithm_options(server: ServerConfig, shape: CheckShape = DEFAULT_SHAPE) -> None:
    """Raise one :class:`ConfigError` naming ``attnmatch.algorithm.<option>`` and the method when the
    options make some method's compaction fail at ``shape`` (the served model's, once it is known).
    Every method is checked, not only ``server.method``: each request may pick its own with
    ``am_method``."""
    if server.algorithm:
        _check(json.dumps(server.algorithm, sort_keys=True), shape)


def _in_own_thread(run) -> None:
    """Run the dry run in a short-lived thread with ONE torch thread, so that the caller's thread count
    is never changed, not even for the duration: torch's OpenMP / MKL settings made with
    ``set_num_threads`` are per thread, and the process-wide default that new threads start from is put
    back before this returns. One thread, because on a busy 2-core host a thread pool made the same
    check ~40x slower (26 s instead of 0.6 s for the ``fast`` preset)."""
    caller_threads = torch.get_num_threads()
    outcome: dict[str, BaseException] = {}

    def target() -> None:
        torch.set_num_threads(1)
        try:
            run()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = exc
        finally:
            torch.set_num_threads(caller_threads)  # the default that threads started later begin with

    worker = threading.Thread(target=target, name="attnmatch-option-check", daemon=True)
    worker.start()
    worker.join()
    if "error" in outcome:
        raise outcome["error"]


@lru_cache(maxsize=8)
def _check(algorithm_json: str, shape: CheckShape) -> None:
    """Memoized on the options and shape: each check runs once per process."""
    _in_own_thread(lambda: _check_methods(algorithm_json, shape))


def _check_methods(algorithm_json: str, shape: CheckShape) -> None:
    server = ServerConfig(algorithm=json.loads(algorithm_json))
    for method in METHOD_NAMES:
        options = server.algorithm_options(method)
        if not options:
            continue
        why = _failure(method, options, shape)
        if why is None:
            continue
        if _failure(method, {}, shape) is not None:
            # Not the user's options: the method fails on its own. A bug, reported as one.
            raise RuntimeError(f"vllm-attnmatch: {method!r} compactions fail even without options ({why})")
        culprits = [name for name in options if _failure(method, {name: options[name]}, shape) is not None]
        raise ConfigError(
            _key(server, method, culprits[0]) if culprits else f"{CONFIG_KEY}.algorithm",
            f"{_listing(options, culprits[:1] or sorted(options))} makes {method!r} compactions fail "
            f"(a request may pick {method!r} with am_method) on a dry run of the {why}",
            "options every method accepts as plain keys; a method's own options under "
            f"{CONFIG_KEY}.algorithm.<method> (methods: {' | '.join(METHOD_NAMES)})",
        )


def _key(server: ServerConfig, method: str, option: str) -> str:
    """``attnmatch.algorithm.<option>``, or ``attnmatch.algorithm.<method>.<option>`` from a section."""
    section = server.algorithm.get(method)
    inside = isinstance(section, dict) and option in section
    return ".".join([CONFIG_KEY, "algorithm", *([method] if inside else []), option])


def _listing(options: dict[str, Any], names: list[str]) -> str:
    return ", ".join(f"{name}={options[name]!r}" for name in names)
