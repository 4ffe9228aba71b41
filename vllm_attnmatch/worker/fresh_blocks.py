"""Which blocks of a step need their β zeroed (worker side).

β is indexed by physical slot, so a block handed out again must not carry its previous owner's β. The
only blocks whose β is kept are those a request starts from through its *own* compacted-prefix hit
(``StepPlan.preserve_bias``, keyed by request): a block another request reached, or one a request
looked up but was not admitted with, never shields a fresh block from zeroing.
"""

from __future__ import annotations


def bias_blocks_to_zero(scheduler_output, preserve: dict[str, tuple[int, ...]]) -> list[int]:
    """Every block given to a request in this step, minus that request's own compacted-prefix blocks."""
    fresh: list[int] = []
    for new in scheduler_output.scheduled_new_reqs:
        keep = preserve.get(new.req_id, ())
        fresh.extend(b for b in new.block_ids[0] if b not in keep)
    cached = scheduler_output.scheduled_cached_reqs
    for req_id, ids in zip(cached.req_ids, cached.new_block_ids):
        if ids is not None:
            keep = preserve.get(req_id, ())
            fresh.extend(b for b in ids[0] if b not in keep)
    return fresh
