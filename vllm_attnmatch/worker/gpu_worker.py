"""CUDA worker and model runner of the plugin (V1 model runner, TRITON_ATTN cache layout).

Not exercised by CI (no GPU there); the kernels it calls are tested against their torch references.
"""

from __future__ import annotations

import torch
from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from vllm_attnmatch.attention.layer_support import check_attention_layers
from vllm_attnmatch.contract.class_paths import TRITON_BACKEND_CLS
from vllm_attnmatch.kernels import gather_paged_kv, scatter_paged_kv
from vllm_attnmatch.worker.executor import LayerPagedKV
from vllm_attnmatch.worker.runner import AttnMatchRunnerMixin, log_worker_start
from vllm_attnmatch.worker.tensor_parallel import separate_dumps_per_rank


class GPUPagedKV(LayerPagedKV):
    """The TRITON_ATTN layout: a layer's ``[blocks, H, bs, 2d]`` cache viewed as K/V ``[blocks, bs, H, d]``."""

    def _caches(self, layer: str):
        attn = self._layers[layer]
        return attn.kv_cache.transpose(1, 2).split(attn.impl.head_size, dim=-1)

    def gather(self, layer, block_ids, length):
        key_cache, value_cache = self._caches(layer)
        ids = torch.as_tensor(block_ids, dtype=torch.int32, device=key_cache.device)
        gathered = gather_paged_kv(key_cache, value_cache, ids, length)
        return gathered.keys, gathered.values

    def write(self, layer, block_ids, keys, values, beta):
        key_cache, value_cache = self._caches(layer)
        ids = torch.as_tensor(block_ids, dtype=torch.int32, device=key_cache.device)
        bias = self._bias[layer]
        bias[ids.long()] = 0.0  # slots after the layout hold future tokens: β = 0
        scatter_paged_kv(keys, values, beta, key_cache, value_cache, bias.transpose(1, 2), ids, 0, False)


class AttnMatchGPUModelRunner(AttnMatchRunnerMixin, GPUModelRunner):
    def _make_paged_kv(self, layer_names):
        forward_context = self.compilation_config.static_forward_context
        check_attention_layers({name: forward_context[name] for name in layer_names})
        bias = {}
        for name in layer_names:
            num_blocks, num_heads, block_size, _ = forward_context[name].kv_cache.shape
            bias[name] = torch.zeros(num_blocks, num_heads, block_size, dtype=torch.float32, device=self.device)
        return GPUPagedKV(forward_context, layer_names, bias), bias


class AttnMatchGPUWorker(Worker):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        register_backend(AttentionBackendEnum.CUSTOM, TRITON_BACKEND_CLS)
        separate_dumps_per_rank(self.rank)
        log_worker_start(self)

    def _make_model_runner(self):
        return AttnMatchGPUModelRunner(self.vllm_config, self.device)
