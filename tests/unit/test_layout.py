"""Geometry of a compaction: block-aligned span, padding, raw tail and the logical-physical offset."""

import pytest

from vllm_attnmatch.engine.layouts import plan_layout, plan_online_layout


def test_span_ends_on_a_block_boundary_and_padding_completes_the_last_block():
    layout = plan_layout(num_tokens=700, prompt_tokens=700, keep_first=4, keep_last=16, ratio=0.1,
                         target_tokens=None, min_span_tokens=32, block_size=128)
    assert (layout.keep_first, layout.span_end, layout.span_tokens) == (4, 640, 636)
    assert layout.target == 63
    assert layout.prefix_physical_len == 128 and layout.pad == 128 - 4 - 63
    assert layout.tail_tokens == 60 and layout.physical_len == 188
    assert layout.offset == 700 - 188


def test_the_last_prompt_token_is_never_in_the_span():
    layout = plan_layout(257, 257, 0, 0, 0.5, None, 1, 128)
    assert layout.span_end == 256
    layout = plan_layout(256, 256, 0, 0, 0.5, None, 1, 128)
    assert layout.span_end == 128


def test_tokens_generated_before_a_preemption_stay_in_the_raw_tail():
    layout = plan_layout(num_tokens=750, prompt_tokens=700, keep_first=0, keep_last=0, ratio=None,
                         target_tokens=70, min_span_tokens=1, block_size=16)
    assert layout.span_end == 688 and layout.tail_tokens == 62 and layout.prefix_physical_len == 80


def test_ratio_one_keeps_everything_with_zero_offset():
    layout = plan_layout(500, 500, 4, 16, 1.0, None, 32, 16)
    assert layout.offset == 0 and layout.pad == 0 and layout.physical_len == 500


@pytest.mark.parametrize("prompt, keep_first, keep_last", [(40, 4, 16), (10, 0, 0), (300, 250, 16)])
def test_too_short_spans_are_not_compacted(prompt, keep_first, keep_last):
    assert plan_layout(prompt, prompt, keep_first, keep_last, 0.5, None, 32, 16) is None


def test_target_tokens_is_capped_by_the_span():
    layout = plan_layout(200, 200, 0, 0, None, 10_000, 1, 16)
    assert layout.target == 192 and layout.offset == 0


def test_online_layout_keeps_sinks_and_the_recent_window_and_accumulates_the_offset():
    first = plan_online_layout(512, 0, keep_first=4, recent_tokens=64, ratio=0.5, min_span_tokens=32)
    assert (first.span_end, first.span_tokens, first.target, first.pad) == (448, 444, 222, 0)
    assert first.online and first.physical_len == 4 + 222 + 64 and first.offset == 512 - 290
    # The next ceiling hit: the request is logically longer, physically at the ceiling again.
    second = plan_online_layout(512, first.offset, 4, 64, 0.5, 32)
    assert second.offset == 2 * first.offset


def test_online_layout_refuses_a_ceiling_that_leaves_nothing_to_compact():
    assert plan_online_layout(100, 0, keep_first=4, recent_tokens=80, ratio=0.5, min_span_tokens=32) is None
