"""vLLM's real scheduler objects for the scheduler-side tests: a ``VllmConfig`` built by ``EngineArgs`` for
the bundled model, the plugin's scheduler on vLLM's real KV-cache manager and block pool (with a pool
size of the test's choosing), and vLLM ``Request`` objects hashed the way EngineCore hashes them. No
model runs: a test drives ``schedule()`` and reads the plan and the pool."""

from __future__ import annotations

import pytest
import torch

BLOCK = 16


@pytest.fixture(scope="session")
def engine_config():
    from vllm.engine.arg_utils import EngineArgs

    from vllm_attnmatch.model import ensure_model

    return EngineArgs(
        model=str(ensure_model()),
        dtype="float32",
        max_model_len=2048,
        block_size=BLOCK,
        enable_prefix_caching=True,
        max_num_batched_tokens=2048,
        additional_config={"attnmatch": {}},
    ).create_engine_config()


@pytest.fixture
def make_scheduler(engine_config):
    """``make_scheduler(num_blocks, num_layers=1)``: the plugin's scheduler over a pool of ``num_blocks``
    blocks (one of them vLLM's null block) for a KV cache of ``num_layers`` attention layers (what the
    workers compact, and what the scheduler hands out layer slices of)."""
    from vllm.v1.kv_cache_interface import KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_attnmatch.contract.kv_spec import AttnMatchFullAttentionSpec
    from vllm_attnmatch.engine.scheduler import AttnMatchScheduler

    def make(num_blocks: int, num_layers: int = 1):
        engine_config.cache_config.num_gpu_blocks = num_blocks
        spec = AttnMatchFullAttentionSpec(block_size=BLOCK, num_kv_heads=3, head_size=64, dtype=torch.float32)
        kv_config = KVCacheConfig(
            num_blocks=num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec([f"model.layers.{i}.self_attn.attn" for i in range(num_layers)], spec)],
        )
        return AttnMatchScheduler(
            engine_config,
            kv_cache_config=kv_config,
            structured_output_manager=StructuredOutputManager(engine_config),
            block_size=BLOCK,
            hash_block_size=BLOCK,
        )

    return make


@pytest.fixture
def make_request(engine_config):
    """``make_request(req_id, prompt_token_ids, max_tokens=8, **am_keys)``: a vLLM request with its block
    hashes."""
    from vllm import SamplingParams
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    hash_fn = get_hash_fn_by_name(engine_config.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    hasher = get_request_block_hasher(BLOCK, hash_fn)

    def make(req_id: str, prompt: list[int], max_tokens: int = 8, **am_keys):
        params = SamplingParams(max_tokens=max_tokens, extra_args=dict(am_keys) or None)
        return Request(req_id, list(prompt), params, None, block_hasher=hasher)

    return make
