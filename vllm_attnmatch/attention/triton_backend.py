"""CUDA attention backend of the plugin: vLLM's TRITON_ATTN plus β and query capture.

Registered as the ``CUSTOM`` backend (the plugin selects it when enabled on CUDA). Batches without
compacted requests run exactly the stock Triton kernel; the rows of compacted requests are recomputed in
one launch of the plugin's paged-attention-with-bias kernel (``vllm_attnmatch.kernels``).

Not exercised by CI (no GPU there); see the README's tested-scope section.
"""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
    TritonAttentionMetadataBuilder,
)

from vllm_attnmatch.attention.common import AttnMatchBackendMixin, AttnMatchImplMixin
from vllm_attnmatch.attention.step_context import StepContext
from vllm_attnmatch.kernels import paged_attention_with_bias


class AttnMatchTritonMetadataBuilder(TritonAttentionMetadataBuilder):
    """The β rows and the query capture run from Python inside the attention op, so attention must
    never be captured in a full CUDA graph. Reporting NEVER makes vLLM resolve its default
    FULL_AND_PIECEWISE mode to PIECEWISE: the rest of the model keeps compilation and CUDA graphs, and
    attention (a splitting op) runs eagerly between the graph pieces. ``--enforce-eager`` still forces
    eager mode for everything."""

    _cudagraph_support = AttentionCGSupport.NEVER


class AttnMatchTritonAttentionBackend(AttnMatchBackendMixin, TritonAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return AttnMatchTritonAttentionImpl

    @staticmethod
    def get_builder_cls():
        return AttnMatchTritonMetadataBuilder


class AttnMatchTritonAttentionImpl(AttnMatchImplMixin, TritonAttentionImpl):
    def attend_biased_rows(self, ctx, layer, query, kv_cache, attn_metadata, output) -> None:
        tokens, out = biased_rows_attention(
            ctx, query, kv_cache, ctx.bias[layer.layer_name], attn_metadata.block_table,
            attn_metadata.seq_lens, self.head_size, self.scale,
        )
        shaped = output.view(output.shape[0], -1, self.head_size) if output.dim() == 2 else output
        shaped.index_copy_(0, tokens, out.to(output.dtype))


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
