"""The worker's compaction of one layer with inputs built the way the runner builds them.

The runner gathers K/V from the paged cache in the model dtype on the device, captures post-RoPE queries on
the device, and builds their positions on the CPU (``torch.arange``); online jobs also gather β on the
device. Issue 13.1: with CPU positions next to CUDA queries every real prefill compaction raised inside
``compact`` and was served uncompacted. Each test runs on the CPU and on CUDA when one is present, in
fp32, bf16 and fp16. No vLLM: the executor and the job geometry are engine-free.
"""

from __future__ import annotations

import math

import pytest
import torch

from vllm_attnmatch.contract.jobs import CompactionJob
from vllm_attnmatch.engine.layouts import plan_layout, plan_online_layout
from vllm_attnmatch.worker.executor import compact_layer, compact_layer_online

H_KV, GROUP, D, BLOCK = 3, 3, 32, 16


def _runner_inputs(device, dtype, prompt_tokens=400, seed=0):
    """K/V ``(H_kv, T, d)`` in the model dtype on the device, queries ``(T, H_q, d)`` fp32 on the device,
    positions ``(T,)`` on the CPU."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(H_KV, prompt_tokens, D, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(H_KV, prompt_tokens, D, generator=g).to(device=device, dtype=dtype)
    queries = torch.randn(prompt_tokens, H_KV * GROUP, D, generator=g).to(device)
    return keys, values, queries, torch.arange(prompt_tokens)


def _job(layout, **kw):
    return CompactionJob("req", layout, (), (), kw.pop("method", "highest_attention"), "context",
                         kw.pop("chunk_tokens", None), kw.pop("options", {}), **kw)


@pytest.mark.parametrize("method", ("highest_attention", "omp", "h2o"))
def test_prefill_compaction_of_a_layer_on_the_device_with_cpu_positions(device, model_dtype, method):
    keys, values, queries, positions = _runner_inputs(device, model_dtype)
    layout = plan_layout(None, prompt_tokens=400, keep_first=4, keep_last=16, ratio=0.1, target_tokens=None,
                         min_span_tokens=32, block_size=BLOCK)
    # 1152 query rows per KV head > max_queries: the rows are subsampled, the path that failed on CUDA.
    job = _job(layout, method=method, options={"max_queries": 512})
    timings: dict = {}
    new_k, new_v, beta, fit_error = compact_layer(job, keys[:, : layout.num_tokens], values[:, : layout.num_tokens],
                                                  queries, positions, 1 / math.sqrt(D), timings=timings)
    assert new_k.shape == (H_KV, layout.physical_len, D) and beta.shape == (H_KV, layout.physical_len)
    assert new_k.dtype == model_dtype and new_v.dtype == model_dtype and beta.dtype == torch.float32
    assert new_k.device.type == device.type and beta.device.type == device.type
    real = beta[:, : layout.keep_first + layout.target]
    padding = beta[:, layout.keep_first + layout.target : layout.prefix_physical_len]
    assert torch.isfinite(real).all() and (padding == -math.inf).all()
    assert torch.isfinite(new_v.float()).all()
    assert torch.equal(new_k[:, :4], keys[:, :4])  # the sinks stay raw
    if method != "h2o":
        assert math.isfinite(fit_error)
        assert {"queries", "scoring", "beta", "values", "gate"} <= set(timings)


def test_synthetic_queries_from_another_device_and_dtype_join_the_context_queries(device, model_dtype):
    keys, values, queries, positions = _runner_inputs(device, model_dtype, seed=1)
    layout = plan_layout(None, prompt_tokens=400, keep_first=4, keep_last=16, ratio=0.1, target_tokens=None,
                         min_span_tokens=32, block_size=BLOCK)
    extra = torch.randn(40, H_KV * GROUP, D).to(model_dtype)  # e.g. a reference forward's queries, on the CPU
    extra_positions = torch.arange(400, 440, dtype=torch.int32)
    new_k, _, beta, _ = compact_layer(_job(layout), keys[:, : layout.num_tokens], values[:, : layout.num_tokens],
                                      queries, positions, 1 / math.sqrt(D), extra, extra_positions)
    assert new_k.device.type == device.type and torch.isfinite(beta[:, : 4 + layout.target]).all()
    # Synthetic queries alone (no context capture) work too.
    alone = compact_layer(_job(layout), keys[:, : layout.num_tokens], values[:, : layout.num_tokens],
                          None, None, 1 / math.sqrt(D), extra, extra_positions)
    assert torch.isfinite(alone[2][:, : 4 + layout.target]).all()


@pytest.mark.parametrize("variant", ("chunked", "head_budgets"))
def test_chunked_and_per_head_compaction_on_the_device(device, model_dtype, variant):
    keys, values, queries, positions = _runner_inputs(device, model_dtype, seed=2)
    layout = plan_layout(None, prompt_tokens=400, keep_first=4, keep_last=16, ratio=0.1, target_tokens=None,
                         min_span_tokens=32, block_size=BLOCK)
    kw = {"chunk_tokens": 128} if variant == "chunked" else {"head_targets": ((layout.target, 20, 5),)}
    new_k, _, beta, _ = compact_layer(_job(layout, **kw), keys[:, : layout.num_tokens],
                                      values[:, : layout.num_tokens], queries, positions, 1 / math.sqrt(D),
                                      layer_index=0)
    assert new_k.device.type == device.type and new_k.dtype == model_dtype
    kept = (beta[:, 4 : 4 + layout.target] > -1e3).sum(1).tolist()
    assert kept == ([layout.target] * H_KV if variant == "chunked" else [layout.target, 20, 5])


def test_online_recompaction_on_the_device(device, model_dtype):
    g = torch.Generator().manual_seed(3)
    P = 160
    keys = torch.randn(H_KV, P, D, generator=g).to(device=device, dtype=model_dtype)
    values = torch.randn(H_KV, P, D, generator=g).to(device=device, dtype=model_dtype)
    beta = torch.zeros(H_KV, P)
    beta[:, 4:30] = torch.rand(H_KV, 26, generator=g)
    beta[:, 30:40] = float("-inf")  # padding of an earlier compaction
    queries = torch.randn(64, H_KV * GROUP, D, generator=g).to(device)
    layout = plan_online_layout(P, base_offset=500, keep_first=4, recent_tokens=32, ratio=0.5, min_span_tokens=8)
    new_k, new_v, new_b, _ = compact_layer_online(_job(layout), keys, values, beta.to(device), queries,
                                                  1 / math.sqrt(D))
    assert new_k.device.type == device.type and new_k.dtype == model_dtype and new_b.dtype == torch.float32
    assert new_k.shape == (H_KV, layout.physical_len, D)
    assert torch.isfinite(new_b[:, : 4 + layout.target]).all()
    assert torch.equal(new_k[:, -32:], keys[:, -32:])  # the recent window stays raw
    # β on the CPU gives the same layout; queries captured in the model dtype work too.
    again = compact_layer_online(_job(layout), keys, values, beta, queries, 1 / math.sqrt(D))
    assert torch.equal(again[0], new_k) and torch.equal(again[2], new_b)
    low = compact_layer_online(_job(layout), keys, values, beta, queries.to(model_dtype), 1 / math.sqrt(D))
    assert torch.isfinite(low[2][:, : 4 + layout.target]).all()
