"""Non-uniform head budgets through the engine: the compacted span is as wide as the largest head budget,
the request is served, and the compacted prefix is reused like any other."""

from __future__ import annotations

import re

import pytest

from vllm_attnmatch.algorithms import budget
from vllm_attnmatch.engine.head_budgets import HeadBudgetPlan

pytestmark = pytest.mark.server


def test_head_budgets_widen_the_span_to_the_largest_head_and_are_reused(head_budgets_server, document):
    server = head_budgets_server
    xargs = {"am_ratio": 0.1}
    before = server.metrics()
    first = server.client().completions.create(
        model="smollm2", prompt=document, max_tokens=12, temperature=0, extra_body={"vllm_xargs": xargs}
    )
    line = re.search(r"T=(\d+) -> t=(\d+) \(span (\d+) -> (\d+)", server.log())
    assert line is not None, server.log()[-3000:]
    span, widened = int(line.group(3)), int(line.group(4))
    plan = HeadBudgetPlan("smollm2-135m", num_layers=30, num_kv_heads=3, max_factor=2.0)
    uniform = budget(span, 0.1)
    assert widened == max(max(row) for row in plan.targets(span, uniform)) > uniform
    again = server.client().completions.create(
        model="smollm2", prompt=document, max_tokens=12, temperature=0, extra_body={"vllm_xargs": xargs}
    )
    after = server.metrics()
    assert after["compactions"] == before["compactions"] + 1 and after["failures"] == before["failures"]
    assert after["prefix_hits"] == before["prefix_hits"] + 1
    assert again.choices[0].text == first.choices[0].text and first.usage.completion_tokens == 12
