"""Geometry of a compaction: what stays raw, what is compacted, and the logical-physical offset."""

import pytest

from vllm_attnmatch.engine.jobs import plan_layout


def test_layout_keeps_the_ranges_raw_and_compacts_the_span():
    layout = plan_layout(num_tokens=700, prompt_tokens=700, keep_first=4, keep_last=16, ratio=0.1,
                         target_tokens=None, min_span_tokens=32)
    assert (layout.keep_first, layout.span_end, layout.span_tokens) == (4, 684, 680)
    assert layout.target == 68
    assert layout.physical_len == 4 + 68 + 16
    assert layout.offset == 700 - layout.physical_len


def test_tokens_generated_before_a_preemption_stay_in_the_raw_tail():
    layout = plan_layout(num_tokens=750, prompt_tokens=700, keep_first=0, keep_last=0, ratio=None,
                         target_tokens=70, min_span_tokens=1)
    assert layout.tail_tokens == 50 and layout.physical_len == 120


def test_ratio_one_keeps_everything_with_zero_offset():
    layout = plan_layout(500, 500, 4, 16, 1.0, None, 32)
    assert layout.offset == 0 and layout.physical_len == 500


@pytest.mark.parametrize("prompt, keep_first, keep_last", [(40, 4, 16), (10, 0, 0), (100, 80, 40)])
def test_too_short_spans_are_not_compacted(prompt, keep_first, keep_last):
    assert plan_layout(prompt, prompt, keep_first, keep_last, 0.5, None, 32) is None


def test_target_tokens_is_capped_by_the_span():
    layout = plan_layout(200, 200, 0, 0, None, 10_000, 1)
    assert layout.target == 200
