"""Start-up dry run of the ``algorithm`` options against every method a request may pick.

Why a dry run rather than a schema: which options a method accepts, and which values make it fail, is
decided by the algorithm code (method dataclass fields, :class:`FitConfig`, general options of
``compact()``) and changes with it. Running the worker's own per-layer entry points
(``worker.executor.compact_layer`` / ``compact_layer_online``) on tiny random tensors, once per method and
per call path (uniform, chunked, per-head budgets, online re-compaction), asks exactly the code that will
run later. A request's ``am_method`` can then never meet options that make its compaction fail.

Costs a fraction of a second on CPU; runs in the front-end process before the engine starts. Must not
import vLLM.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, Iterator

import torch

from vllm_attnmatch.config import CONFIG_KEY, METHOD_NAMES, MIN_CHUNK_TOKENS, ConfigError, ServerConfig

# Tiny shapes that still exercise every branch a real compaction takes: GQA (4 query heads on 2 KV
# heads), raw sinks, a span several chunks long, causal query positions, and a budget large enough that
# keys are chosen by score after the protected sinks and recent window.
_KV_HEADS, _QUERY_HEADS, _HEAD_DIM = 2, 4, 16
_TOKENS, _KEEP_FIRST, _SPAN_END, _TARGET = 160, 4, 132, 40
_ONLINE_QUERIES = 8


def _cases(method: str, options: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """(call path, thunk) pairs: each thunk runs one engine-shaped compaction and raises on failure."""
    from vllm_attnmatch.engine.jobs import CompactionJob, CompactionLayout
    from vllm_attnmatch.worker.executor import compact_layer, compact_layer_online

    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(_KV_HEADS, _TOKENS, _HEAD_DIM, generator=gen)
    values = torch.randn(_KV_HEADS, _TOKENS, _HEAD_DIM, generator=gen)
    queries = torch.randn(_TOKENS, _QUERY_HEADS, _HEAD_DIM, generator=gen)
    positions = torch.arange(_TOKENS)
    scale = _HEAD_DIM**-0.5
    layout = CompactionLayout(num_tokens=_TOKENS, keep_first=_KEEP_FIRST, span_end=_SPAN_END, target=_TARGET)

    def job(**kwargs) -> CompactionJob:
        fields = dict(req_id="option-check", layout=layout, src_block_ids=(), dst_block_ids=(), method=method,
                      queries="context", chunk_tokens=None, options=dict(options))
        fields.update(kwargs)
        return CompactionJob(**fields)

    yield "prefill", lambda: compact_layer(job(), keys, values, queries, positions, scale)
    yield "chunked (am_chunk_tokens)", lambda: compact_layer(
        job(chunk_tokens=MIN_CHUNK_TOKENS), keys, values, queries, positions, scale
    )
    yield "per-head budgets (head_budgets)", lambda: compact_layer(
        job(head_targets=((_TARGET // 2, _TARGET),)), keys, values, queries, positions, scale, layer_index=0
    )
    # Online: the source already holds compacted entries with β and −inf padding; decode queries.
    beta = 0.1 * torch.randn(_KV_HEADS, _TOKENS, generator=gen)
    beta[:, _SPAN_END - 2 : _SPAN_END] = float("-inf")
    online = CompactionLayout(num_tokens=_TOKENS, keep_first=_KEEP_FIRST, span_end=_SPAN_END, target=_TARGET * 2,
                              online=True)
    decode_queries = queries[-_ONLINE_QUERIES:]
    yield "online (max_kv_tokens)", lambda: compact_layer_online(
        job(layout=online), keys, values, beta, decode_queries, scale
    )


def _failure(method: str, options: dict[str, Any]) -> str | None:
    """Why a compaction with these options fails on some call path, or None when every path works."""
    # One thread: on tensors this small, a thread pool only adds contention (30x slower on a busy host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path, run in _cases(method, options):
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - any failure here would fail the real compaction
                return f"{path}: {type(exc).__name__}: {exc}"
        return None
    finally:
        torch.set_num_threads(threads)


def check_algorithm_options(server: ServerConfig) -> None:
    """Raise one :class:`ConfigError` naming ``attnmatch.algorithm.<option>`` and the method when the
    options make some method's compaction fail. Every method is checked, not only ``server.method``:
    each request may pick its own with ``am_method``."""
    if server.algorithm:
        _check(json.dumps(server.algorithm, sort_keys=True))


@lru_cache(maxsize=8)
def _check(algorithm_json: str) -> None:
    """Memoized on the options: the flag's parser and the engine-config hook both check, once."""
    server = ServerConfig(algorithm=json.loads(algorithm_json))
    for method in METHOD_NAMES:
        options = server.algorithm_options(method)
        if not options:
            continue
        why = _failure(method, options)
        if why is None:
            continue
        if _failure(method, {}) is not None:
            # Not the user's options: the method fails on its own. A bug, reported as one.
            raise RuntimeError(f"vllm-attnmatch: {method!r} compactions fail even without options ({why})")
        culprits = [name for name in options if _failure(method, {name: options[name]}) is not None]
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
