"""The plugin's support matrix, enforced once at start-up.

Compaction rewrites a request's paged KV in place and adds a per-slot logit bias β. Anything that reads
or writes that KV behind the plugin's back, stores it in another form, or changes what attention computes
would be silently wrong, so each such setting is refused with one message that names it
(:class:`ConfigError`, the same message shape as a bad ``attnmatch`` key). Three places check, each at the
earliest point where its facts exist:

- :func:`check_engine_args`: the command-line settings, before vLLM builds its config (front end);
- :func:`check_vllm_config`: facts of the model and the resolved config (front end, right after vLLM
  built it: the model's config and the CPU block size exist only then);
- ``attention.layer_support.check_attention_layers``: the instantiated attention layers (each worker,
  after the model is built): the authoritative view of ALiBi, soft-capping, sinks, windows and KV
  sharing, whatever config field a model uses for them. It lives beside the backends, below the front
  end, because the workers run it.

Nothing here changes a setting; :mod:`vllm_attnmatch.frontend.plugin` turns off what it must (async scheduling,
V2 runner) after these checks passed.
"""

from __future__ import annotations

import os
from typing import Any

from vllm_attnmatch.attention.layer_support import refuse, require_readable_cpu_layout
from vllm_attnmatch.config import CONFIG_KEY, server_config_from
from vllm_attnmatch.contract.class_paths import CPU_WORKER_CLS, GPU_WORKER_CLS, SCHEDULER_CLS


# -- command-line settings (EngineArgs, before the config is built) -------------------------------------


def check_engine_args(args: Any) -> None:
    """Refuse settings of ``args`` (an ``EngineArgs``) the plugin does not support."""
    if args.scheduler_cls not in (None, SCHEDULER_CLS) and "vllm.v1.core" not in str(args.scheduler_cls):
        refuse("--scheduler-cls", args.scheduler_cls, "the plugin brings its own scheduler")
    if args.worker_cls not in ("auto", CPU_WORKER_CLS, GPU_WORKER_CLS):
        refuse("--worker-cls", args.worker_cls, "the plugin brings its own worker")
    _check_kv_cache_dtype(args.kv_cache_dtype)
    if getattr(args, "kv_transfer_config", None) is not None:
        refuse("--kv-transfer-config", "set", _KV_CONNECTOR_WHY)
    if getattr(args, "kv_offloading_size", None):
        refuse("--kv-offloading-size", args.kv_offloading_size, _KV_CONNECTOR_WHY)
    if getattr(args, "speculative_config", None):
        refuse("--speculative-config", "set", "draft tokens would be verified against a cache the scheduler compacts")
    _check_parallel_sizes(
        pipeline=args.pipeline_parallel_size,
        data=args.data_parallel_size,
        decode_context=args.decode_context_parallel_size,
        prefill_context=getattr(args, "prefill_context_parallel_size", 1),
    )
    if args.async_scheduling:  # None (vLLM's default) is turned off by the plugin; an explicit True is refused
        refuse("--async-scheduling", True, "the block swap after a compaction must land before the next step")
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0").strip().lower() in ("1", "true"):
        refuse("VLLM_USE_V2_MODEL_RUNNER", os.environ["VLLM_USE_V2_MODEL_RUNNER"],
               "the physical-slot bookkeeping lives in the V1 model runner; unset it or set it to 0")
    if getattr(args, "enable_prompt_embeds", False):
        refuse("--enable-prompt-embeds", True, "compaction reads the request's prompt token ids")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Set by vLLM for --api-server-count > 1 (before the config is built) or by the user: /metrics is
        # then served from a multi-process registry that never sees the plugin's collector.
        refuse("--api-server-count", "> 1 (PROMETHEUS_MULTIPROC_DIR is set)",
               "the vllm_attnmatch_* metrics would vanish from /metrics; run one API server "
               "(and leave PROMETHEUS_MULTIPROC_DIR unset)")


_KV_CONNECTOR_WHY = "KV connectors would move compacted blocks as if they held one token per slot"


def _check_kv_cache_dtype(cache_dtype: str) -> None:
    if cache_dtype not in ("auto", None):
        refuse("--kv-cache-dtype", cache_dtype, "a KV cache in another dtype than the model's (quantised: read and "
               "rewritten as raw bytes without its scales) is not supported (allowed: auto)")


def _check_parallel_sizes(*, pipeline: int, data: int, decode_context: int, prefill_context: int) -> None:
    if pipeline != 1:
        refuse("--pipeline-parallel-size", pipeline, "compaction runs every layer on one worker (allowed: 1)")
    if data != 1:
        refuse("--data-parallel-size", data, "not tested with several engines yet (allowed: 1)")
    if decode_context != 1:
        refuse("--decode-context-parallel-size", decode_context,
               "the KV of a request would be split across ranks by token (allowed: 1)")
    if prefill_context != 1:
        refuse("--prefill-context-parallel-size", prefill_context,
               "the KV of a request would be split across ranks by token (allowed: 1)")


# -- the built config: model facts and resolved settings ------------------------------------------------


def check_vllm_config(config: Any) -> None:
    """Refuse what only the built ``VllmConfig`` can tell: the model's attention and the resolved cache."""
    model = config.model_config
    hf = model.hf_text_config
    if model.runner_type != "generate":
        refuse("--runner", model.runner_type, "compaction serves text generation only (allowed: generate)")
    if model.is_encoder_decoder:
        refuse("--model", model.model, "encoder-decoder models are not supported (decoder-only models only)")
    if model.is_attention_free or model.is_hybrid:
        refuse("--model", model.model, "hybrid or attention-free models keep state compaction cannot rewrite")
    if model.use_mla:
        refuse("--model", model.model, "multi-head latent attention (MLA) caches a latent, not per-head K and V")
    if model.uses_mrope:
        refuse("--model", model.model, "multimodal RoPE positions are not kept logical after a compaction")
    if model.is_multimodal_model:
        refuse("--model", model.model, "multimodal models are not supported yet: compaction and its synthetic "
               "reference queries see the prompt's token ids only (text-only decoders)")
    if model.uses_alibi:
        refuse("--model", model.model, "ALiBi biases logits by distance, which compaction does not preserve")
    for field in ("attn_logit_softcapping", "logit_softcapping"):
        if getattr(hf, field, None):
            refuse("--model", model.model, f"logit soft-capping ({field}) is not modelled by the fit")
    if model.get_sliding_window() or getattr(hf, "layer_types", None) and any(
        kind != "full_attention" for kind in hf.layer_types
    ):
        refuse("--model", model.model, "sliding-window or hybrid attention layers (one full-attention KV group only)")
    _check_kv_cache_dtype(config.cache_config.cache_dtype)
    if config.kv_transfer_config is not None:
        refuse("--kv-transfer-config", "set", _KV_CONNECTOR_WHY)
    if config.lora_config is not None:
        refuse("--enable-lora", True, "not supported yet: synthetic reference queries would ignore the adapter")
    if config.speculative_config is not None:
        refuse("--speculative-config", "set", "draft tokens would be verified against a cache the scheduler compacts")
    parallel = config.parallel_config
    settings = server_config_from(getattr(config, "additional_config", None))
    if settings is not None and settings.on_policy and parallel.tensor_parallel_size > 1:
        refuse(f"{CONFIG_KEY}.on_policy", True, "the on-policy pass runs the whole model's reference forward on one "
               f"worker, which holds only its own KV heads at --tensor-parallel-size {parallel.tensor_parallel_size} "
               "(allowed: --tensor-parallel-size 1)")
    _check_parallel_sizes(
        pipeline=parallel.pipeline_parallel_size,
        data=parallel.data_parallel_size,
        decode_context=parallel.decode_context_parallel_size,
        prefill_context=getattr(parallel, "prefill_context_parallel_size", 1),
    )
    _check_cpu_layout(config)


def cpu_kv_layout(config: Any) -> str | None:
    """The CPU_ATTN layout ("ISA") vLLM will pick for this config on this machine; None off CPU."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return None
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    model = config.model_config
    return _get_attn_isa(model.dtype, config.cache_config.block_size, model.get_head_size(),
                         config.cache_config.cache_dtype)


def _check_cpu_layout(config: Any) -> None:
    isa = cpu_kv_layout(config)
    if isa is not None:
        model = config.model_config
        require_readable_cpu_layout(isa, model.dtype, config.cache_config.block_size, model.get_head_size())
