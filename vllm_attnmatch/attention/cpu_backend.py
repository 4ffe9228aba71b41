"""CPU attention backend of the plugin: the stock CPU_ATTN backend plus β and query capture.

Registered over ``CPU_ATTN`` (the CPU platform always picks that name) by the plugin's worker, only when
the plugin is enabled. Batches without compacted requests run exactly the stock kernel; rows of
compacted requests are recomputed in torch with β added (see :mod:`cpu_paged`).
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_attnmatch.attention.cpu_paged import SUPPORTED_ISAS, paged_attention_with_bias
from vllm_attnmatch.attention.step_context import StepContext
from vllm_attnmatch.engine.kv_manager import AttnMatchFullAttentionSpec

BACKEND_PATH = "vllm_attnmatch.attention.cpu_backend.AttnMatchCPUAttentionBackend"


class AttnMatchCPUAttentionBackend(CPUAttentionBackend):
    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        if type(spec) is FullAttentionSpec:
            spec = AttnMatchFullAttentionSpec.from_spec(spec)
        return spec

    @staticmethod
    def get_impl_cls():
        return AttnMatchCPUAttentionImpl


class AttnMatchCPUAttentionImpl(CPUAttentionBackendImpl):
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
            if layer.isa not in SUPPORTED_ISAS:
                raise RuntimeError(f"vllm-attnmatch: CPU KV layout of ISA {layer.isa!r} is not supported")
            bias = ctx.bias[layer.layer_name]
            starts = attn_metadata.query_start_loc.tolist()
            seq_lens = attn_metadata.seq_lens.tolist()
            for row in ctx.biased_batch_rows:
                start, end = starts[row], starts[row + 1]
                if end == start:
                    continue
                out = paged_attention_with_bias(
                    query[start:end], kv_cache, bias, attn_metadata.block_table[row], seq_lens[row], self.scale
                )
                output[start:end] = out.reshape(output[start:end].shape).to(output.dtype)
        return output
