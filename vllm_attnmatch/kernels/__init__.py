"""Triton kernels for Attention Matching, with the torch references the CPU path runs.

Each operation comes as a Triton launcher ``<op>_triton`` (CUDA; or CPU under ``TRITON_INTERPRET=1``, for
tests only), a plain torch reference ``<op>_ref`` (any device, fp32 maths) and a dispatcher that picks Triton
when :func:`triton_available` says so for the input's device, else torch:

  launcher / reference                                     dispatcher
  key_scores_triton / key_scores_ref                       score_keys
  paged_attention_bias_triton / paged_attention_bias_ref   paged_attention_with_bias
  gather_paged_kv_triton / gather_paged_kv_ref             gather_paged_kv
  scatter_paged_kv_triton / scatter_paged_kv_ref           scatter_paged_kv

(The first two dispatchers are not called ``key_scores`` / ``paged_attention_bias``: those are the kernel
submodules, and importing a submodule rebinds the package attribute of the same name.)

This package must import without triton installed (launchers load lazily, on first use) and must never
import vLLM: it is shared by the engine-free algorithms and by the vLLM glue.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from typing import Any, Optional, Union

import torch

from .reference import (
    GatheredKV,
    KeyScores,
    gather_paged_kv_ref,
    key_scores_ref,
    paged_attention_bias_ref,
    scatter_paged_kv_ref,
)

__all__ = [
    "HAS_TRITON",
    "triton_available",
    "KeyScores",
    "GatheredKV",
    "score_keys",
    "key_scores_ref",
    "key_scores_triton",
    "paged_attention_with_bias",
    "paged_attention_bias_ref",
    "paged_attention_bias_triton",
    "gather_paged_kv",
    "gather_paged_kv_ref",
    "gather_paged_kv_triton",
    "scatter_paged_kv",
    "scatter_paged_kv_ref",
    "scatter_paged_kv_triton",
]

#: triton is installed (not imported: importing it is deferred to the first launcher use).
HAS_TRITON: bool = importlib.util.find_spec("triton") is not None

_LAUNCHERS = {
    "key_scores_triton": "key_scores",
    "paged_attention_bias_triton": "paged_attention_bias",
    "gather_paged_kv_triton": "paged_gather_scatter",
    "scatter_paged_kv_triton": "paged_gather_scatter",
}


def __getattr__(name: str) -> Any:  # PEP 562: import the Triton modules only when a launcher is asked for
    if name in _LAUNCHERS:
        module = importlib.import_module(f".{_LAUNCHERS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    if not HAS_TRITON:
        return False
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # a broken install must fall back to torch, not crash the engine
        return False
    return True


def triton_available(device: Union[torch.device, str, None] = None, *, allow_interpreter: bool = False) -> bool:
    """Whether the Triton kernels can run for tensors on ``device``.

    True on CUDA devices when triton imports. On other devices True only with ``allow_interpreter=True`` and
    ``TRITON_INTERPRET=1`` in the environment (the slow CPU interpreter, meant for tests).
    ``device=None`` asks about the current CUDA device.
    """
    if not _triton_importable():
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    if dev.type == "cuda":
        return torch.cuda.is_available()
    return allow_interpreter and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _use_triton(t: torch.Tensor, use_triton: Optional[bool]) -> bool:
    return triton_available(t.device) if use_triton is None else use_triton


def score_keys(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    bias: Optional[torch.Tensor] = None,
    query_positions: Optional[torch.Tensor] = None,
    key_positions: Optional[torch.Tensor] = None,
    *,
    use_triton: Optional[bool] = None,
    **triton_options: Any,
) -> KeyScores:
    """Per-key max / mean / rms attention and per-query lse; Triton on CUDA, torch elsewhere (see
    :func:`key_scores_ref` for shapes). ``use_triton`` forces a path; ``triton_options`` (tile sizes,
    ``allow_tf32``) go to :func:`key_scores_triton` and are ignored by the torch path."""
    if _use_triton(queries, use_triton):
        return __getattr__("key_scores_triton")(queries, keys, scale, bias, query_positions, key_positions,
                                                **triton_options)
    return key_scores_ref(queries, keys, scale, bias, query_positions, key_positions)


def paged_attention_with_bias(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    bias_cache: Optional[torch.Tensor],
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor] = None,
    *,
    use_triton: Optional[bool] = None,
    **triton_options: Any,
) -> torch.Tensor:
    """Causal paged attention with a per-slot bias; Triton on CUDA, torch elsewhere (see
    :func:`paged_attention_bias_ref` for the layout). ``use_triton`` forces a path; ``triton_options``
    (``max_seqlen_q``, ``max_seqlen_k``, ``num_splits``, ``block_m``, ``tile``, ``allow_tf32``) go to
    :func:`paged_attention_bias_triton` and are ignored by the torch path."""
    if _use_triton(query, use_triton):
        return __getattr__("paged_attention_bias_triton")(
            query, key_cache, value_cache, bias_cache, block_table, cu_seqlens_q, seq_lens, scale, out,
            **triton_options,
        )
    return paged_attention_bias_ref(query, key_cache, value_cache, bias_cache, block_table, cu_seqlens_q, seq_lens,
                                    scale, out)


def gather_paged_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_ids: torch.Tensor,
    num_tokens: int,
    bias_cache: Optional[torch.Tensor] = None,
    *,
    use_triton: Optional[bool] = None,
) -> GatheredKV:
    """One request's paged K/V (and bias) as ``(H_kv, T, d)`` tensors; Triton on CUDA, torch elsewhere."""
    if _use_triton(key_cache, use_triton):
        return __getattr__("gather_paged_kv_triton")(key_cache, value_cache, block_ids, num_tokens, bias_cache)
    return gather_paged_kv_ref(key_cache, value_cache, block_ids, num_tokens, bias_cache)


def scatter_paged_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    beta: Optional[torch.Tensor],
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    bias_cache: Optional[torch.Tensor],
    block_ids: torch.Tensor,
    start_slot: int = 0,
    pad_tail: bool = True,
    *,
    use_triton: Optional[bool] = None,
) -> None:
    """Write per-head keys/values/β into a request's blocks, padding the tail; Triton on CUDA, torch elsewhere."""
    if _use_triton(key_cache, use_triton):
        return __getattr__("scatter_paged_kv_triton")(keys, values, beta, key_cache, value_cache, bias_cache,
                                                      block_ids, start_slot, pad_tail)
    return scatter_paged_kv_ref(keys, values, beta, key_cache, value_cache, bias_cache, block_ids, start_slot,
                                pad_tail)
