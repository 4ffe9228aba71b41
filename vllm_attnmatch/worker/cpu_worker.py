"""CPU worker and model runner of the plugin (vLLM's CPU platform, V1 model runner)."""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm_attnmatch.attention import cpu_paged
from vllm_attnmatch.attention.cpu_backend import layer_kv_layout
from vllm_attnmatch.attention.layer_support import check_attention_layers
from vllm_attnmatch.contract.class_paths import CPU_BACKEND_CLS
from vllm_attnmatch.worker.executor import LayerPagedKV
from vllm_attnmatch.worker.runner import AttnMatchRunnerMixin, log_worker_start
from vllm_attnmatch.worker.tensor_parallel import separate_dumps_per_rank


class CPUPagedKV(LayerPagedKV):
    """The CPU_ATTN layout (see :mod:`cpu_paged`); writes go through vLLM's own cache op and reads
    through the packing learned from that op, so the in-block packing is always the kernel's."""

    def gather(self, layer, block_ids, length):
        attn = self._layers[layer]
        return cpu_paged.gather_kv(attn.kv_cache, block_ids, length, layer_kv_layout(attn, attn.kv_cache))

    def write(self, layer, block_ids, keys, values, beta):
        attn = self._layers[layer]
        kv_cache = attn.kv_cache
        num_blocks, num_heads, block_size, _ = kv_cache.shape
        length = keys.shape[1]
        blocks = torch.as_tensor(block_ids, dtype=torch.long)
        slots = blocks[torch.arange(length) // block_size] * block_size + torch.arange(length) % block_size
        key_cache, value_cache = kv_cache.view(num_blocks, num_heads, 2 * block_size, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(
            keys.transpose(0, 1).contiguous().to(kv_cache.dtype),
            values.transpose(0, 1).contiguous().to(kv_cache.dtype),
            key_cache,
            value_cache,
            slots,
            attn.isa,
            k_scale=attn._k_scale_float,
            v_scale=attn._v_scale_float,
            kv_cache_dtype=attn.impl.kv_cache_dtype,
        )
        bias = self._bias[layer]
        bias[blocks] = 0.0
        cpu_paged.write_bias(bias, slots, beta)


class AttnMatchCPUModelRunner(AttnMatchRunnerMixin, CPUModelRunner):
    def _make_paged_kv(self, layer_names):
        forward_context = self.compilation_config.static_forward_context
        check_attention_layers({name: forward_context[name] for name in layer_names})
        bias = {}
        for name in layer_names:
            num_blocks, num_heads, block_size, _ = forward_context[name].kv_cache.shape
            bias[name] = torch.zeros(num_blocks, num_heads, block_size, dtype=torch.float32)
        return CPUPagedKV(forward_context, layer_names, bias), bias


class AttnMatchCPUWorker(CPUWorker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Before the model is built, so its attention layers pick our backend subclass.
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND_CLS)
        separate_dumps_per_rank(self.rank)
        log_worker_start(self)

    def init_device(self):
        import vllm.v1.worker.cpu_worker as cpu_worker_module

        # CPUWorker.init_device builds the runner by module-global name; point it at ours.
        original = cpu_worker_module.CPUModelRunner
        cpu_worker_module.CPUModelRunner = AttnMatchCPUModelRunner
        try:
            super().init_device()
        finally:
            cpu_worker_module.CPUModelRunner = original
        if not isinstance(self.model_runner, AttnMatchCPUModelRunner):
            raise RuntimeError("vllm-attnmatch: the CPU worker did not build the plugin's model runner")
