"""CPU attention backend of the plugin: the stock CPU_ATTN backend plus β and query capture.

Registered over ``CPU_ATTN`` (the CPU platform always picks that name) by the plugin's worker, only when
the plugin is enabled. Batches without compacted requests run exactly the stock kernel; rows of
compacted requests are recomputed in torch with β added (see :mod:`cpu_paged`): every compacted decode
row of the step in one batch per layer, from a plan of the step's rows read once for all layers.
"""

from __future__ import annotations

import functools

import torch
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from vllm_attnmatch.attention.common import AttnMatchBackendMixin, AttnMatchImplMixin
from vllm_attnmatch.attention.cpu_paged import BiasedRows, KVLayout, attend_biased_rows, probe_layout

PLAN_KEY = "cpu_biased_rows"  # StepContext.per_step entry: where this step's compacted rows are


@functools.lru_cache(maxsize=None)
def kv_layout(isa: str, dtype: torch.dtype, block_size: int, head_dim: int) -> KVLayout:
    """The packing vLLM's cache op uses for ``isa`` (learned once per process by probing the op itself).
    Raises if the op refuses the combination or its packing is not a one-to-one placement."""
    from vllm import _custom_ops as ops

    def write(keys, values, cache):
        num_blocks, num_heads, size, _ = cache.shape
        key_cache, value_cache = cache.view(num_blocks, num_heads, 2 * size, -1).chunk(2, dim=2)
        slots = torch.arange(keys.shape[0], dtype=torch.long)
        ops.cpu_attn_reshape_and_cache(keys, values, key_cache, value_cache, slots, isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    return probe_layout(write, block_size, head_dim, dtype)


def layer_kv_layout(layer, kv_cache: torch.Tensor) -> KVLayout:
    """:func:`kv_layout` of an attention layer's cache (``[blocks, H_kv, block_size, 2d]``)."""
    return kv_layout(layer.isa, kv_cache.dtype, int(kv_cache.shape[2]), int(kv_cache.shape[3]) // 2)


class AttnMatchCPUAttentionBackend(AttnMatchBackendMixin, CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return AttnMatchCPUAttentionImpl


class AttnMatchCPUAttentionImpl(AttnMatchImplMixin, CPUAttentionBackendImpl):
    def attend_biased_rows(self, ctx, layer, query, kv_cache, attn_metadata, output) -> None:
        plan = ctx.per_step.get(PLAN_KEY)
        if plan is None:  # the first layer of the step reads where the rows are; the others reuse it
            plan = ctx.per_step[PLAN_KEY] = BiasedRows.of(
                ctx.biased_batch_rows, attn_metadata.query_start_loc, attn_metadata.seq_lens,
                attn_metadata.block_table, int(kv_cache.shape[2]))
        attend_biased_rows(plan, query, kv_cache, ctx.bias[layer.layer_name], attn_metadata.block_table, self.scale,
                           layer_kv_layout(layer, kv_cache), output)
