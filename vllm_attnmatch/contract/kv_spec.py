"""The KV-cache spec of the layers the plugin manages.

The attention backends report it for their full-attention layers (``customize_spec``); vLLM's
``KVCacheSpecRegistry`` maps it to the scheduler's block manager (``engine.kv_manager``). Both sides need
the class, neither owns it, so it lives here.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vllm.v1.kv_cache_interface import FullAttentionSpec


@dataclass(frozen=True, kw_only=True)
class AttnMatchFullAttentionSpec(FullAttentionSpec):
    """Full attention whose requests may be compacted; same memory layout as FullAttentionSpec."""

    @classmethod
    def from_spec(cls, spec: FullAttentionSpec) -> "AttnMatchFullAttentionSpec":
        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec) if f.init})
