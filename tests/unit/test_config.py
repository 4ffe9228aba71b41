"""Server settings and per-request keys: parsing, presets, errors that name the key; the section resolved
once in the front end and shipped by content."""

import json
import math

import pytest

from vllm_attnmatch.config import (
    PRESETS,
    ConfigError,
    RequestParams,
    ServerConfig,
    effective_params,
    parse_request_params,
    parse_server_config,
    resolve_section,
    server_config_from,
)
from vllm_attnmatch.frontend.option_check import check_algorithm_options


@pytest.mark.parametrize("preset", PRESETS)
def test_every_bundled_preset_is_valid(preset):
    config = parse_server_config({"preset": preset})
    assert isinstance(config, ServerConfig)
    check_algorithm_options(config)  # its algorithm options pass the start-up dry run of every method


def test_inline_keys_override_the_preset():
    config = parse_server_config({"preset": "fast", "keep_last": 99})
    assert config.keep_last == 99 and config.max_query_tokens == parse_server_config({"preset": "fast"}).max_query_tokens


def test_preset_can_be_a_yaml_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("method: snapkv\nratio: 0.25\n")
    config = parse_server_config({"preset": str(path)})
    assert config.method == "snapkv" and config.ratio == 0.25


@pytest.mark.parametrize(
    "section, key",
    [
        ({"ratio": 0}, "attnmatch.ratio"),
        ({"method": "kmeans"}, "attnmatch.method"),
        ({"colour": "blue"}, "attnmatch.colour"),
        ({"preset": "nope"}, "attnmatch.preset"),
        ({"ratio": 0.1, "target_tokens": 5}, "attnmatch.ratio"),
    ],
)
def test_bad_server_settings_name_the_key(section, key):
    with pytest.raises(ConfigError) as err:
        parse_server_config(section)
    assert err.value.key == key


@pytest.mark.parametrize(
    "algorithm, key, method",
    [
        # The example config.py used to give: an option no method has; every compaction would fail.
        ({"score": "rms"}, "attnmatch.algorithm.score", "highest_attention"),
        # highest_attention's own option as a plain key: fine for the server's method, fatal for a request
        # that picks omp with am_method. Every method is checked, not only the server's default.
        ({"reduction": "rms"}, "attnmatch.algorithm.reduction", "omp"),
        # A value every method accepts by name but no compaction survives.
        ({"max_queries": "all"}, "attnmatch.algorithm.max_queries", "highest_attention"),
        # A typo inside a method's own section names the section.
        ({"snapkv": {"windw": 64}}, "attnmatch.algorithm.snapkv.windw", "snapkv"),
    ],
)
def test_algorithm_options_that_fail_a_compaction_stop_start_up_naming_option_and_method(algorithm, key, method):
    config = parse_server_config({"algorithm": algorithm})  # the shape is fine: only the dry run can tell
    with pytest.raises(ConfigError) as err:
        check_algorithm_options(config)
    assert err.value.key == key
    assert repr(method) in str(err.value) and "am_method" in str(err.value)


@pytest.mark.parametrize(
    "algorithm, key",
    [
        ({"bias": 0.0}, "attnmatch.algorithm.bias"),  # set by the engine on every call
        ({"omp": {"scale": 2.0}}, "attnmatch.algorithm.omp.scale"),
        ({"kmeans": {"k": 3}}, "attnmatch.algorithm.kmeans"),  # a section for a method that does not exist
        ({"omp": 3}, "attnmatch.algorithm.omp"),  # a method's section must be a mapping
    ],
)
def test_misplaced_algorithm_options_are_refused_when_parsed(algorithm, key):
    with pytest.raises(ConfigError) as err:
        parse_server_config({"algorithm": algorithm})
    assert err.value.key == key


def test_method_sections_reach_only_their_method_and_pass_the_start_up_check():
    config = parse_server_config(
        {"algorithm": {"max_queries": 512, "highest_attention": {"reduction": "rms"}, "snapkv": {"window": 8}}}
    )
    check_algorithm_options(config)
    assert config.algorithm_options("highest_attention") == {"max_queries": 512, "reduction": "rms"}
    assert config.algorithm_options("snapkv") == {"max_queries": 512, "window": 8}
    assert config.algorithm_options("omp") == {"max_queries": 512}


def test_plugin_is_off_without_its_section():
    assert server_config_from({}) is None
    assert server_config_from({"other_plugin": {}}) is None
    assert server_config_from({"attnmatch": {}}) == ServerConfig()


@pytest.mark.parametrize(
    "keys, bad",
    [
        ({"am_ratio": 0}, "am_ratio"),
        ({"am_ratio": 1.01}, "am_ratio"),
        ({"am_ratio": math.nan}, "am_ratio"),
        ({"am_ratio": math.inf}, "am_ratio"),
        ({"am_ratio": "0.5"}, "am_ratio"),
        ({"am_target_tokens": 0}, "am_target_tokens"),
        ({"am_target_tokens": 10**12}, "am_target_tokens"),
        ({"am_target_tokens": 1.5}, "am_target_tokens"),
        ({"am_method": "H2O"}, "am_method"),
        ({"am_queries": 3}, "am_queries"),
        ({"am_keep_last": -2}, "am_keep_last"),
        ({"am_chunk_tokens": 8}, "am_chunk_tokens"),
        ({"am_max_kv_tokens": 0}, "am_max_kv_tokens"),
        ({"am_ratio": 0.1, "am_target_tokens": 3}, "am_ratio"),
        ({"am_unknown": 1}, "am_unknown"),
    ],
)
def test_bad_request_keys_name_the_key_and_the_allowed_values(keys, bad):
    with pytest.raises(ConfigError) as err:
        parse_request_params(keys)
    assert err.value.key == bad
    assert "allowed" in str(err.value)


def test_other_extra_args_are_not_ours_to_judge():
    params = parse_request_params({"am_ratio": 0.5, "kv_transfer_params": {"x": 1}, "my_flag": 1})
    assert params == RequestParams(am_ratio=0.5)
    assert parse_request_params(None).is_empty


def test_request_keys_override_server_defaults_and_a_request_budget_replaces_both():
    server = parse_server_config({"ratio": 0.2, "method": "omp", "keep_first": 4})
    assert effective_params(server, RequestParams()).ratio == 0.2
    merged = effective_params(server, RequestParams(am_target_tokens=50, am_keep_first=0))
    assert (merged.ratio, merged.target_tokens, merged.method, merged.keep_first) == (None, 50, "omp", 0)
    assert effective_params(parse_server_config({}), RequestParams()).compacts_prefill is False


# ------------------------------------------------------------------------------------------------
# Configuration resolved once, in the front end (issue 21 §5)
# ------------------------------------------------------------------------------------------------

SHARES = {"L0H0": 1.0, "L0H1": 3.0, "L0H2": 2.0, "L1H0": 0.5}


def _engine_config(additional_config: dict, max_model_len: int = 2048):
    """vLLM's ``VllmConfig`` built through the plugin's engine-config hook, as the front end builds it."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_attnmatch.model import ensure_model

    return EngineArgs(
        model=str(ensure_model()), dtype="float32", max_model_len=max_model_len, block_size=16,
        additional_config=additional_config,
    ).create_engine_config()


def test_a_relative_preset_and_share_file_reach_the_engine_by_content(tmp_path, monkeypatch):
    """EngineCore and the workers parse the section from the ``VllmConfig`` in their own working
    directory: a preset or share file named relative to the front end's must already be read."""
    import pickle

    from vllm_attnmatch.engine.head_budgets import HeadBudgetPlan

    front, engine = tmp_path / "front", tmp_path / "engine"
    front.mkdir(), engine.mkdir()
    (front / "mine.yaml").write_text("ratio: 0.2\nhead_budgets: shares.json\n")
    (front / "shares.json").write_text(json.dumps(SHARES))
    monkeypatch.chdir(front)
    users = {"attnmatch": {"preset": "mine.yaml", "keep_last": 8}}
    vllm_config = _engine_config(users)
    assert users == {"attnmatch": {"preset": "mine.yaml", "keep_last": 8}}  # the caller's dict is not changed

    shipped = pickle.loads(pickle.dumps(vllm_config.additional_config))  # what EngineCore receives
    monkeypatch.chdir(engine)
    for name in ("mine.yaml", "shares.json"):
        (front / name).unlink()
    config = server_config_from(shipped)  # in another directory, the files gone
    assert config.ratio == 0.2 and config.keep_last == 8
    assert config.head_budgets == SHARES
    plan = HeadBudgetPlan(config.head_budgets, num_layers=2, num_kv_heads=3, max_factor=2.0)
    assert plan.shares[(0, 1)] == 3.0
    assert resolve_section(shipped["attnmatch"]) == shipped["attnmatch"]  # resolving twice changes nothing


def test_different_share_tables_give_different_settings_lines():
    """The settings line is the compacted-prefix store's salt: inlined shares must still tell apart."""
    one = parse_server_config({"head_budgets": SHARES}).summary()
    other = parse_server_config({"head_budgets": {**SHARES, "L1H0": 0.25}}).summary()
    assert one != other and "L0H1" not in one  # a digest, not the whole table on every log line


@pytest.mark.parametrize(
    "files, section, key",
    [
        ({"bad.yaml": "ratio: [0.2\n  keep_last: 8\n"}, {"preset": "bad.yaml"}, "attnmatch.preset"),
        ({"bad.json": '{"L0H0": 1.0,'}, {"head_budgets": "bad.json"}, "attnmatch.head_budgets"),
        ({"bad.json": '{"layer0": 1.0}'}, {"head_budgets": "bad.json"}, "attnmatch.head_budgets"),
        ({}, {"head_budgets": {"L0H0": -1}}, "attnmatch.head_budgets"),
    ],
)
def test_unreadable_preset_or_share_file_stops_the_front_end_in_one_line_naming_the_key(
    tmp_path, monkeypatch, files, section, key
):
    """A broken file used to pass start-up (it exists) and fail in EngineCore, or stop it with a YAML
    traceback: it must be one ConfigError line naming the key, before the engine starts."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        _engine_config({"attnmatch": section})
    assert err.value.key == key
    assert len(str(err.value).splitlines()) == 1 and str(err.value).startswith(key + ": ")


def test_the_option_check_runs_at_the_served_models_shapes():
    """SmolLM2-135M: 3 KV heads, 9 query heads of 64 per layer; a few hundred tokens, not the old tiny
    2 x 4 x 16 x 160."""
    from vllm_attnmatch.frontend.option_check import CheckShape
    from vllm_attnmatch.frontend.plugin import model_check_shape

    shape = model_check_shape(_engine_config({"attnmatch": {}}))
    assert shape == CheckShape(kv_heads=3, query_heads=9, head_dim=64, tokens=384)
    assert shape.span_end - shape.keep_first > 300 and shape.target > 64


def test_the_engine_config_hook_runs_the_option_check_at_the_served_models_shapes(monkeypatch):
    """The hook, not only the helper: building the engine config checks the options once, at the model's
    shapes and with the server's section."""
    from vllm_attnmatch.frontend import plugin
    from vllm_attnmatch.frontend.option_check import CheckShape

    calls = []
    monkeypatch.setattr(plugin, "check_algorithm_options", lambda server, shape: calls.append((server, shape)))
    _engine_config({"attnmatch": {"method": "omp", "algorithm": {"omp": {"max_queries": 64}}}})
    ((server, shape),) = calls
    assert shape == CheckShape(kv_heads=3, query_heads=9, head_dim=64, tokens=384)
    assert server.method == "omp" and server.algorithm["omp"]["max_queries"] == 64


def test_the_option_check_leaves_the_torch_thread_count_alone():
    """It runs single-threaded in a thread of its own: neither the caller's count nor the default that
    threads started later begin with may change (an in-process engine would compute on one thread)."""
    import threading

    import torch

    threads = torch.get_num_threads()
    check_algorithm_options(parse_server_config({"algorithm": {"omp": {"max_queries": 64}}, "method": "omp"}))
    assert torch.get_num_threads() == threads
    later = {}
    thread = threading.Thread(target=lambda: later.update(threads=torch.get_num_threads()))
    thread.start(), thread.join()
    assert later["threads"] == threads
