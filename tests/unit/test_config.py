"""Server settings and per-request keys: parsing, presets, errors that name the key."""

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
    server_config_from,
)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_bundled_preset_is_valid(preset):
    config = parse_server_config({"preset": preset})
    assert isinstance(config, ServerConfig)


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
