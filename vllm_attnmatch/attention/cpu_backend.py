"""CPU attention backend of the plugin: the stock CPU_ATTN backend plus β and query capture.

Registered over ``CPU_ATTN`` (the CPU platform always picks that name) by the plugin's worker, only when
the plugin is enabled. Batches without compacted requests run exactly the stock kernel; rows of
compacted requests are recomputed in torch with β added (see :mod:`cpu_paged`).
"""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_attnmatch.attention.common import AttnMatchBackendMixin, AttnMatchImplMixin
from vllm_attnmatch.attention.cpu_paged import SUPPORTED_ISAS, paged_attention_with_bias

BACKEND_PATH = "vllm_attnmatch.attention.cpu_backend.AttnMatchCPUAttentionBackend"


class AttnMatchCPUAttentionBackend(AttnMatchBackendMixin, CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return AttnMatchCPUAttentionImpl


class AttnMatchCPUAttentionImpl(AttnMatchImplMixin, CPUAttentionBackendImpl):
    def attend_biased_rows(self, ctx, layer, query, kv_cache, attn_metadata, output) -> None:
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
