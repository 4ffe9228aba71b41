"""Non-uniform head budgets in the engine: the bundled share file, the physical cost, and the layout."""

import math

import pytest
import torch

from vllm_attnmatch.config import ConfigError, parse_server_config
from vllm_attnmatch.contract.jobs import CompactionJob
from vllm_attnmatch.engine.head_budgets import HeadBudgetPlan
from vllm_attnmatch.engine.layouts import plan_layout, widen_layout
from vllm_attnmatch.worker.executor import compact_layer


def test_bundled_shares_keep_the_total_and_cap_every_head_at_the_factor():
    plan = HeadBudgetPlan("smollm2-135m", num_layers=30, num_kv_heads=3, max_factor=2.0)
    targets = torch.tensor(plan.targets(span_tokens=1020, uniform_target=102))
    assert targets.shape == (30, 3)
    assert int(targets.max()) <= 2 * 102 and int(targets.min()) >= 1
    assert abs(int(targets.sum()) - 102 * 90) <= 90  # same total (rounding down per head)
    assert int(targets.max()) > int(targets.min())  # really non-uniform


def test_unknown_share_file_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError, match="head_budgets"):
        HeadBudgetPlan("no-such-model", 30, 3, 2.0)
    with pytest.raises(ConfigError, match=r"^attnmatch\.head_budgets: .*no-such-model"):
        parse_server_config({"head_budgets": "no-such-model"})  # refused at start-up, before the engine


def test_layer_is_compacted_per_head_and_padded_to_the_widest_head():
    torch.manual_seed(0)
    H, T, d = 3, 240, 16
    keys, values = torch.randn(H, T, d), torch.randn(H, T, d)
    layout = plan_layout(None, prompt_tokens=220, keep_first=4, keep_last=0, ratio=0.1, target_tokens=None,
                         min_span_tokens=8, block_size=16)
    widened = widen_layout(layout, 40, block_size=16)
    assert widened.target == 40 and widened.prefix_physical_len % 16 == 0 and widened.span_end == layout.span_end
    job = CompactionJob("r", widened, (), (), "highest_attention", "context", None,
                        head_targets=((5, 40, 12), (30, 30, 30)))
    queries, positions = torch.randn(150, 6, d), torch.arange(150) + 40
    new_k, _, beta, _ = compact_layer(job, keys[:, : widened.num_tokens], values[:, : widened.num_tokens],
                                      queries, positions, 1 / math.sqrt(d), layer_index=0)
    span = beta[:, 4 : 4 + widened.target]
    real = span > -1e3  # padded slots carry no attention (β = -inf or a huge negative)
    assert real.sum(1).tolist() == [5, 40, 12]
    assert new_k.shape[1] == widened.physical_len
