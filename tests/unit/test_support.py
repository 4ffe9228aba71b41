"""The support matrix: each unsupported setting is refused at start-up with one message naming it.

The checks run on vLLM's own objects: real ``EngineArgs``, the ``VllmConfig`` vLLM builds from them for the
bundled model (or for a copy of its ``config.json`` with one attention feature added), and real CPU
attention impls.
"""

from __future__ import annotations

import json
import re
import shutil
import types

import pytest
import torch

from vllm_attnmatch.attention.layer_support import check_attention_layers
from vllm_attnmatch.config import ConfigError
from vllm_attnmatch.frontend.support import check_engine_args, check_vllm_config, cpu_kv_layout
from vllm_attnmatch.model import ensure_model

EngineArgs = pytest.importorskip("vllm.engine.arg_utils").EngineArgs


@pytest.fixture(scope="module")
def model_dir():
    return ensure_model()


def _args(model_dir, **kwargs):
    return EngineArgs(model=str(model_dir), max_model_len=2048, **kwargs)


def _refused(setting: str):
    return pytest.raises(ConfigError, match=rf"^{re.escape(setting)}: .*cannot be used with attnmatch")


# -- command-line settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, setting",
    [
        ({"kv_cache_dtype": "fp8"}, "--kv-cache-dtype"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "--kv-cache-dtype"),
        ({"kv_cache_dtype": "bfloat16"}, "--kv-cache-dtype"),
        ({"kv_offloading_size": 4.0}, "--kv-offloading-size"),
        ({"speculative_config": {"method": "ngram", "num_speculative_tokens": 2}}, "--speculative-config"),
        ({"pipeline_parallel_size": 2}, "--pipeline-parallel-size"),
        ({"data_parallel_size": 2}, "--data-parallel-size"),
        ({"decode_context_parallel_size": 2}, "--decode-context-parallel-size"),
        ({"prefill_context_parallel_size": 2}, "--prefill-context-parallel-size"),
        ({"async_scheduling": True}, "--async-scheduling"),
        ({"enable_prompt_embeds": True}, "--enable-prompt-embeds"),
        ({"scheduler_cls": "my.Scheduler"}, "--scheduler-cls"),
        ({"worker_cls": "my.Worker"}, "--worker-cls"),
    ],
)
def test_unsupported_settings_are_refused_naming_the_setting(model_dir, kwargs, setting):
    with _refused(setting):
        check_engine_args(_args(model_dir, **kwargs))


def test_kv_connector_is_refused(model_dir):
    from vllm.config import KVTransferConfig

    connector = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    with _refused("--kv-transfer-config"):
        check_engine_args(_args(model_dir, kv_transfer_config=connector))


def test_v2_model_runner_asked_for_is_refused(model_dir, monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with _refused("VLLM_USE_V2_MODEL_RUNNER"):
        check_engine_args(_args(model_dir))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    check_engine_args(_args(model_dir))


def test_several_api_servers_are_refused(model_dir, monkeypatch, tmp_path):
    """vLLM sets PROMETHEUS_MULTIPROC_DIR for --api-server-count > 1 before it builds the config; its
    /metrics then reads a multi-process registry that our collector is not on."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with _refused("--api-server-count"):
        check_engine_args(_args(model_dir))
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    check_engine_args(_args(model_dir))


@pytest.mark.parametrize(
    "kwargs", [{"dtype": "float32"}, {"dtype": "bfloat16"}, {"dtype": "float32", "tensor_parallel_size": 3}]
)
def test_supported_settings_pass_both_checks(model_dir, kwargs):
    args = _args(model_dir, **kwargs)
    check_engine_args(args)
    check_vllm_config(args.create_engine_config())


# -- facts of the built config ----------------------------------------------------------------------------


def _model_with(tmp_path, model_dir, **overrides):
    """A copy of the bundled model's folder whose config.json has ``overrides`` (weights linked, not copied)."""
    folder = tmp_path / "model"
    folder.mkdir()
    for item in model_dir.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(overrides)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "overrides, why",
    [
        ({"sliding_window": 256}, "sliding-window"),
        ({"layer_types": ["sliding_attention", "full_attention"] * 15, "sliding_window": 256}, "sliding-window"),
        ({"alibi": True}, "ALiBi"),
        ({"attn_logit_softcapping": 50.0}, "soft-capping"),
    ],
)
def test_model_attention_features_are_refused_naming_the_model(tmp_path, model_dir, overrides, why):
    folder = _model_with(tmp_path, model_dir, **overrides)
    config = _args(folder, dtype="float32").create_engine_config()
    with pytest.raises(ConfigError, match=rf"^--model: .*{why}"):
        check_vllm_config(config)


def test_on_policy_is_refused_at_tensor_parallel_above_one(model_dir):
    """The on-policy pass needs every KV head on one worker; at TP = 1 the same setting passes."""
    attnmatch = {"attnmatch": {"preset": "quality"}}
    with _refused("attnmatch.on_policy"):  # the plugin checks the config as vLLM builds it
        check_vllm_config(_args(model_dir, dtype="float32", tensor_parallel_size=3,
                                additional_config=attnmatch).create_engine_config())
    check_vllm_config(_args(model_dir, dtype="float32", additional_config=attnmatch).create_engine_config())


def test_lora_is_refused(model_dir):
    config = _args(model_dir, dtype="float32", enable_lora=True).create_engine_config()
    with _refused("--enable-lora"):
        check_vllm_config(config)


def test_pooling_runner_is_refused(model_dir):
    config = _args(model_dir, dtype="float32", runner="pooling").create_engine_config()
    with _refused("--runner"):
        check_vllm_config(config)


def test_resolved_quantised_cache_is_refused_even_if_set_after_the_arguments(model_dir):
    config = _args(model_dir, dtype="float32").create_engine_config()
    config.cache_config.cache_dtype = "fp8"  # e.g. set by a quantisation config, not by --kv-cache-dtype
    with _refused("--kv-cache-dtype"):
        check_vllm_config(config)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_this_machine_picks_the_cpu_kv_layout_the_e2e_tests_run(model_dir, dtype):
    """vLLM's own packing choice on this CPU (``vec`` on x86 without AMX, for both dtypes) is the one the
    end-to-end tests exercise, in float32 and bfloat16."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or torch.cpu._is_amx_tile_supported():
        pytest.skip("x86 CPU without AMX only")
    assert cpu_kv_layout(_args(model_dir, dtype=dtype).create_engine_config()) == "vec"


# -- the instantiated attention layers (worker) -----------------------------------------------------------


_CONFIG = {}


def _cpu_layer(isa="vec", dtype=torch.float32, **impl_kwargs):
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    if not _CONFIG:
        _CONFIG["fp32"] = _args(ensure_model(), dtype="float32").create_engine_config()

    kwargs = dict(num_heads=9, head_size=64, scale=0.125, num_kv_heads=3, alibi_slopes=None, sliding_window=None,
                  kv_cache_dtype="auto")
    kwargs.update(impl_kwargs)
    # The Attention module's two attributes the check reads: its impl and the layout vLLM gave it.
    with set_current_vllm_config(_CONFIG["fp32"]):
        impl = CPUAttentionBackendImpl(**kwargs)
    kv_cache = torch.zeros(4, 3, 128, 2 * 64, dtype=dtype)
    return types.SimpleNamespace(impl=impl, isa=isa, kv_cache=kv_cache, kv_sharing_target_layer_name=None)


@pytest.mark.parametrize("isa, dtype", [("vec", torch.float32), ("vec", torch.bfloat16), ("amx", torch.bfloat16)])
def test_plain_attention_layers_pass_in_every_packing_the_plugin_can_read(isa, dtype):
    check_attention_layers({"model.layers.0.self_attn.attn": _cpu_layer(isa, dtype)})


@pytest.mark.parametrize(
    "layer, setting, why",
    [
        (lambda: _cpu_layer(alibi_slopes=[0.5, 0.25, 0.125] * 3), "--model", "ALiBi"),
        (lambda: _cpu_layer(logits_soft_cap=30.0), "--model", "soft-capping"),
        (lambda: _cpu_layer(sinks=torch.zeros(9)), "--model", "sinks"),
        (lambda: _cpu_layer(sliding_window=128), "--model", "sliding window"),
        (lambda: _cpu_layer(kv_cache_dtype="fp8"), "--kv-cache-dtype", "quantised"),
        (lambda: _cpu_layer(isa="neon"), "--dtype", "'neon' packing .*cannot read"),  # ARM only: vLLM refuses it here
    ],
)
def test_attention_layers_with_unsupported_features_are_refused(layer, setting, why):
    with pytest.raises(ConfigError, match=rf"^{re.escape(setting)}: .*{why}"):
        check_attention_layers({"model.layers.3.self_attn.attn": layer()})


# -- end to end: the server refuses to start, with one message ---------------------------------------------


@pytest.mark.server
def test_server_with_fp8_kv_cache_refuses_to_start_naming_the_setting(model_dir):
    from harness.server import Server

    server = Server("fp8", model_dir, {"attnmatch": {"preset": "default"}},
                    ["--enforce-eager", "--kv-cache-dtype", "fp8"])
    try:
        assert server.proc.wait(timeout=300) != 0
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert re.search(r"ConfigError: --kv-cache-dtype: 'fp8' cannot be used with attnmatch", log), log[-2000:]
    assert "EngineCore" not in log  # refused in the front end, before any engine process started
