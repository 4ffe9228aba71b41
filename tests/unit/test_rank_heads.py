"""Per-head budgets under tensor parallelism: planned for global KV heads, each rank takes its own rows."""

import pytest

from vllm_attnmatch.engine.head_budgets import HeadBudgetPlan
from vllm_attnmatch.worker.tensor_parallel import rank_head_targets, rank_kv_heads


@pytest.mark.parametrize(
    "total, tp, expected",
    [
        (3, 1, [[0, 1, 2]]),
        (3, 3, [[0], [1], [2]]),  # the bundled model at TP = 3
        (8, 2, [[0, 1, 2, 3], [4, 5, 6, 7]]),
        (2, 4, [[0], [0], [1], [1]]),  # more ranks than KV heads: vLLM replicates (rank // replicas)
    ],
)
def test_each_rank_holds_vllms_slice_of_the_kv_heads(total, tp, expected):
    assert [list(rank_kv_heads(total, tp, rank)) for rank in range(tp)] == expected


def test_ranks_take_their_own_rows_of_the_global_budgets():
    plan = HeadBudgetPlan("smollm2-135m", num_layers=30, num_kv_heads=3, max_factor=2.0)
    targets = plan.targets(span_tokens=1020, uniform_target=102)
    per_rank = [rank_head_targets(targets, 3, 3, rank) for rank in range(3)]
    assert all(len(rows) == 30 and all(len(r) == 1 for r in rows) for rows in per_rank)
    # Stitched back in rank order, the ranks' rows are the global plan (not rank 0's head three times).
    assert tuple(tuple(per_rank[r][layer][0] for r in range(3)) for layer in range(30)) == targets
    assert len({rows for rows in per_rank}) == 3
    assert rank_head_targets(targets, 3, 1, 0) == targets


def test_budgets_for_another_head_count_are_refused():
    with pytest.raises(ValueError, match="cover 1 KV heads, the model has 3"):
        rank_head_targets(((5,), (6,)), 3, 3, 0)
