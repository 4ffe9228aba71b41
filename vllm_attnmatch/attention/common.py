"""What the plugin's CPU and CUDA attention backends share: the KV-cache spec that selects the plugin's
block manager, and the per-layer hook that captures reference queries and recomputes compacted rows."""

from __future__ import annotations

from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_attnmatch.attention.step_context import StepContext
from vllm_attnmatch.contract.kv_spec import AttnMatchFullAttentionSpec


class AttnMatchBackendMixin:
    """Mixed in front of a vLLM attention backend: its full-attention layers report our spec."""

    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        if type(spec) is FullAttentionSpec:
            spec = AttnMatchFullAttentionSpec.from_spec(spec)
        return spec


class AttnMatchImplMixin:
    """Mixed in front of a vLLM attention impl: the stock kernel runs for every row, then compacted
    requests' rows are recomputed with β by ``attend_biased_rows`` (one per layout)."""

    # Set by the model runner once the KV cache exists (None before: warm-up and profiling).
    attnmatch: StepContext | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        ctx = self.attnmatch
        if ctx is None or attn_metadata is None:
            return output
        if ctx.capture:
            ctx.record_queries(layer.layer_name, query)
        if ctx.biased_batch_rows:
            self.attend_biased_rows(ctx, layer, query, kv_cache, attn_metadata, output)
        return output

    def attend_biased_rows(self, ctx: StepContext, layer, query, kv_cache, attn_metadata, output) -> None:
        raise NotImplementedError
