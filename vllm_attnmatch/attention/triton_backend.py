"""CUDA attention backend of the plugin: vLLM's TRITON_ATTN plus β and query capture.

Registered as the ``CUSTOM`` backend (the plugin selects it when enabled on CUDA). Batches without
compacted requests run exactly the stock Triton kernel; the rows of compacted requests are recomputed in
one launch of the plugin's paged-attention-with-bias kernel (``vllm_attnmatch.kernels``).

Not exercised by CI (no GPU there); see the README's tested-scope section.
"""

from __future__ import annotations

from vllm.v1.attention.backends.triton_attn import TritonAttentionBackend, TritonAttentionImpl
from vllm.v1.kv_cache_interface import FullAttentionSpec

from vllm_attnmatch.attention.step_context import StepContext
from vllm_attnmatch.engine.kv_manager import AttnMatchFullAttentionSpec
from vllm_attnmatch.kernels import paged_attention_with_bias

BACKEND_PATH = "vllm_attnmatch.attention.triton_backend.AttnMatchTritonAttentionBackend"


class AttnMatchTritonAttentionBackend(TritonAttentionBackend):
    @classmethod
    def customize_spec(cls, spec):
        spec = super().customize_spec(spec)
        if type(spec) is FullAttentionSpec:
            spec = AttnMatchFullAttentionSpec.from_spec(spec)
        return spec

    @staticmethod
    def get_impl_cls():
        return AttnMatchTritonAttentionImpl


class AttnMatchTritonAttentionImpl(TritonAttentionImpl):
    attnmatch: StepContext | None = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        ctx = self.attnmatch
        if ctx is None or attn_metadata is None:
            return output
        if ctx.capture:
            ctx.record_queries(layer.layer_name, query)
        if ctx.biased_batch_rows:
            tokens, out = biased_rows_attention(
                ctx, query, kv_cache, ctx.bias[layer.layer_name], attn_metadata.block_table,
                attn_metadata.seq_lens, self.head_size, self.scale,
            )
            shaped = output.view(output.shape[0], -1, self.head_size) if output.dim() == 2 else output
            shaped.index_copy_(0, tokens, out.to(output.dtype))
        return output


def biased_rows_attention(ctx: StepContext, query, kv_cache, bias, block_table, seq_lens, head_size, scale):
    """Attention with β for the compacted requests' rows only, in one kernel launch.

    ``kv_cache`` is a layer's ``[blocks, H, bs, 2d]`` cache, ``bias`` the ``[blocks, H, bs]`` side tensor.
    Returns (token indices into the step's query tensor, their outputs ``(n, H_q, d)``).
    """
    device = query.device
    rows = ctx.biased_rows_tensor.to(device, non_blocking=True)
    tokens = ctx.biased_token_index.to(device, non_blocking=True)
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    out = paged_attention_with_bias(
        query.index_select(0, tokens),
        key_cache,
        value_cache,
        bias.transpose(1, 2),
        block_table.index_select(0, rows),
        ctx.biased_cu_seqlens.to(device, non_blocking=True),
        seq_lens.index_select(0, rows),
        scale,
        max_seqlen_q=ctx.biased_max_query_len,
    )
    return tokens, out
