"""The support matrix as the attention layers see it: what each worker checks once its model is built.

The front end refuses what the command line and the model's config tell (``frontend.support``); only the
instantiated layers show ALiBi, soft-capping, sinks, windows, KV sharing and the CPU cache packing
whatever config field a model uses for them, so the workers check those here. Each refusal is one
:class:`ConfigError` naming the setting, the same message shape as a bad ``attnmatch`` key.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_attnmatch.config import CONFIG_KEY, ConfigError


def refuse(setting: str, value: Any, why: str) -> None:
    raise ConfigError(setting, f"{value!r} cannot be used with {CONFIG_KEY}: {why}")


def check_attention_layers(layers: dict[str, Any]) -> None:
    """Refuse attention features the fit and the biased attention do not model, as the layers really have
    them (``layers``: name → vLLM ``Attention`` of the KV cache the plugin manages)."""
    for name, layer in layers.items():
        impl = layer.impl
        if getattr(impl, "alibi_slopes", None) is not None:
            refuse("--model", name, "ALiBi biases logits by distance, which compaction does not preserve")
        if getattr(impl, "logits_soft_cap", None):
            refuse("--model", name, "logit soft-capping is not modelled by the fit")
        if getattr(impl, "sinks", None) is not None:
            refuse("--model", name, "attention sinks are not modelled by the fit")
        window = getattr(impl, "sliding_window", None)
        if window not in (None, -1) and window != (-1, -1):
            refuse("--model", name, f"a sliding window ({window}) is not supported (full attention only)")
        if getattr(layer, "kv_sharing_target_layer_name", None) or getattr(impl, "kv_sharing_target_layer_name", None):
            refuse("--model", name, "layers sharing another layer's KV cache would be compacted twice")
        kv_dtype = getattr(impl, "kv_cache_dtype", "auto")
        if kv_dtype not in ("auto", None):
            refuse("--kv-cache-dtype", kv_dtype, "a quantised KV cache is not supported (allowed: auto)")
        isa, kv_cache = getattr(layer, "isa", None), getattr(layer, "kv_cache", None)
        if isa is not None and isinstance(kv_cache, torch.Tensor) and kv_cache.dim() == 4:
            require_readable_cpu_layout(isa, kv_cache.dtype, int(kv_cache.shape[2]), int(kv_cache.shape[3]) // 2)


def require_readable_cpu_layout(isa: str, dtype, block_size: int, head_dim: int) -> None:
    """The plugin reads a CPU cache through the packing it learns from vLLM's own cache op for ``isa``
    (:func:`attention.cpu_backend.kv_layout`); a packing it cannot learn is refused here, not mid-request."""
    from vllm_attnmatch.attention.cpu_backend import kv_layout

    try:
        kv_layout(isa, dtype, block_size, head_dim)
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means: cannot read this packing
        refuse("--dtype", str(dtype).removeprefix("torch."),
               f"vLLM stores this CPU's KV cache in its {isa!r} packing (block size {block_size}, head size "
               f"{head_dim}), which the plugin cannot read: {exc}")
