"""Worker-side pieces without vLLM: the bounded ring of captured queries, the query_mix cap, and the
β-aware re-compaction of a cache that already holds compacted entries and −inf padding."""

import math

import torch

from vllm_attnmatch.algorithms.targets import compute_targets
from vllm_attnmatch.attention.step_context import CaptureRows, StepContext
from vllm_attnmatch.contract.jobs import CompactionJob
from vllm_attnmatch.engine.layouts import plan_online_layout
from vllm_attnmatch.worker.executor import compact_layer_online


def test_the_query_ring_keeps_the_newest_rows_and_stays_bounded():
    ctx = StepContext()
    for step in range(50):  # decode steps: one row each
        ctx.begin_step({"r": CaptureRows(0, 1, first_position=step, stride=1)}, [])
        ctx.record_queries("layer", torch.full((1, 2, 4), float(step)))
        ctx.trim({"r": 8})
        assert ctx.captured_rows["r"] <= 16
    queries, positions = ctx.take_queries("r", keep=True)
    assert positions[-1] == 49 and 8 <= positions.numel() <= 16
    assert torch.equal(queries["layer"][:, 0, 0], positions.float())  # rows and positions stay aligned
    again, _ = ctx.take_queries("r", keep=True)
    assert again["layer"].shape == queries["layer"].shape  # keep=True does not consume the ring


def _attention(q, k, v, beta, scale):
    """Plain softmax attention with an additive per-entry β (the reference the fit must match)."""
    logits = q @ k.transpose(-1, -2) * scale + beta[:, None, :]
    return torch.softmax(logits, -1) @ v


def test_online_recompaction_uses_old_beta_drops_padding_and_keeps_the_recent_window_raw():
    torch.manual_seed(0)
    H, P, d, Hq = 2, 96, 16, 4
    keys, values = torch.randn(H, P, d), torch.randn(H, P, d)
    beta = torch.zeros(H, P)
    beta[:, 4:20] = torch.rand(H, 16) * 2  # entries compacted before carry β > 0
    beta[:, 20:28] = float("-inf")  # padding of an earlier prefill compaction
    queries = torch.randn(64, Hq, d)
    layout = plan_online_layout(P, base_offset=300, keep_first=4, recent_tokens=16, ratio=0.5, min_span_tokens=8)
    job = CompactionJob("r", layout, (), (), "highest_attention", "context", None)
    scale = 1 / math.sqrt(d)
    new_k, new_v, new_b, _ = compact_layer_online(job, keys, values, beta, queries, scale)
    assert new_k.shape == (H, layout.physical_len, d) and new_b.shape == (H, layout.physical_len)
    assert torch.isfinite(new_b[:, : 4 + layout.target]).all()  # padding was dropped, not kept
    assert torch.equal(new_k[:, -16:], keys[:, -16:]) and torch.equal(new_b[:, -16:], beta[:, -16:])
    assert torch.equal(new_k[:, :4], keys[:, :4])
    # The old β must enter the fit: the same compaction blind to it reproduces the original
    # attention (which has that β) clearly worse.
    pooled = queries.reshape(64, H, Hq // H, d).permute(1, 2, 0, 3).reshape(H, -1, d)
    exact = compute_targets(keys, values, pooled, scale, beta, None).output

    def error(k, v, b):
        return float((_attention(pooled, k, v, b, scale) - exact).norm() / exact.norm())

    blind_beta = torch.where(torch.isfinite(beta), torch.zeros_like(beta), beta)
    blind = compact_layer_online(job, keys, values, blind_beta, queries, scale)
    assert error(new_k, new_v, new_b) < 0.5 * error(*blind[:3])


def test_query_mix_cap_keeps_rows_evenly_spread_and_zero_keeps_none():
    from vllm_attnmatch.worker.query_sources import cap_rows

    positions = torch.arange(100)
    queries = {"layer": torch.arange(100).float()[:, None, None].expand(100, 2, 4)}
    kept, kept_pos = cap_rows(queries, positions, 5)
    assert kept_pos.tolist() == [0, 25, 50, 74, 99] and torch.equal(kept["layer"][:, 0, 0], kept_pos.float())
    none, none_pos = cap_rows(queries, positions, 0)
    assert none_pos.numel() == 0 and none["layer"].shape[0] == 0
    same, same_pos = cap_rows(queries, positions, 1000)
    assert same_pos is positions
