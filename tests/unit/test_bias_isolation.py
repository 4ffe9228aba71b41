"""β never leaks between requests (issue 21 §1), on vLLM's real scheduler, KV-cache manager and block
pool at the pool's limit: only a request *scheduled in this step* keeps the β of the compacted-prefix
blocks it starts from; every other block handed out gets β = 0."""

from __future__ import annotations

import torch
from vllm.v1.request import RequestStatus

from vllm_attnmatch.contract.jobs import SCHEDULER_OUTPUT_ATTR, StepPlan
from vllm_attnmatch.worker.fresh_blocks import bias_blocks_to_zero

BLOCK = 16
DOCUMENT = list(range(1000, 1128))  # 128 tokens: a 2-block compacted prefix at am_ratio 0.25
QUESTION = [7] * 8


def _plan(output) -> StepPlan:
    return getattr(output, SCHEDULER_OUTPUT_ATTR, None) or StepPlan()


def _publish_compacted_prefix(scheduler, request) -> tuple[int, ...]:
    """A compacted prefix of ``request``'s prompt, published in the store under the key the request will
    look up (what booking does when a compaction is applied), its blocks back in the pool's free queue."""
    admission, store = scheduler._am_admission, scheduler._am_store
    params = admission.params_for(request)
    layout = admission.prefill_layout(request, params)
    key = store.prefix_key(request, layout, params.cache_key())
    pool = scheduler.kv_cache_manager.block_pool
    blocks = pool.get_new_blocks(layout.prefix_physical_len // BLOCK)
    store.store(key, blocks)
    pool.free_blocks(blocks)
    return tuple(b.block_id for b in blocks)


def _pool_at_its_limit(make_scheduler, make_request):
    """11 usable blocks: the stored prefix (2, free) and a plain request holding the 9 others. The
    compacting request then finds its prefix but cannot be admitted (it needs one more block)."""
    scheduler = make_scheduler(num_blocks=12)
    waiting = make_request("compacting", DOCUMENT + QUESTION, am_ratio=0.25)
    stored = _publish_compacted_prefix(scheduler, waiting)
    scheduler.add_request(make_request("holder", list(range(5000, 5000 + 9 * BLOCK))))
    scheduler.schedule()
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == len(stored)
    scheduler.add_request(waiting)
    return scheduler, stored


def test_a_request_that_finds_its_compacted_prefix_but_is_not_admitted_preserves_no_block(make_scheduler, make_request):
    scheduler, stored = _pool_at_its_limit(make_scheduler, make_request)
    output = scheduler.schedule()
    assert "compacting" not in output.num_scheduled_tokens  # it waits: the pool is at its limit
    assert scheduler._am_requests["compacting"].lookup_hit is not None  # ... although its prefix was found
    # Its hit blocks stay free, so the pool may hand them out fresh in this very step: none may be kept.
    assert not set(stored) & {b for ids in _plan(output).preserve_bias.values() for b in ids}


def test_the_admitted_request_keeps_its_prefix_beta_and_every_fresh_block_is_zeroed(make_scheduler, make_request):
    scheduler, stored = _pool_at_its_limit(make_scheduler, make_request)
    scheduler.schedule()
    scheduler.finish_requests("holder", RequestStatus.FINISHED_ABORTED)
    scheduler.add_request(make_request("plain", list(range(9000, 9000 + 4 * BLOCK))))
    output = scheduler.schedule()
    plan = _plan(output)
    assert plan.preserve_bias == {"compacting": stored}
    manager = scheduler.kv_cache_manager
    compacting, plain = manager.get_block_ids("compacting")[0], manager.get_block_ids("plain")[0]
    assert tuple(compacting[: len(stored)]) == stored

    bias = torch.full((12, 3, BLOCK), 5.0)  # every block carries some earlier request's β
    bias.index_fill_(0, torch.tensor(bias_blocks_to_zero(output, plan.preserve_bias)), 0.0)
    assert bool((bias[list(stored)] == 5.0).all())  # the compacted prefix keeps its β
    fresh = compacting[len(stored):] + plain
    assert fresh and bool((bias[fresh] == 0.0).all())


def test_a_block_is_kept_only_for_the_request_that_holds_it_through_its_hit(make_scheduler, make_request):
    """The waiting request's hit blocks are handed to another request fresh: they are zeroed even when a
    plan names them as some other request's preserved prefix."""
    scheduler, stored = _pool_at_its_limit(make_scheduler, make_request)
    scheduler.schedule()  # the compacting request found its prefix and waits
    scheduler.finish_requests(["compacting", "holder"], RequestStatus.FINISHED_ABORTED)
    scheduler.add_request(make_request("plain", list(range(9000, 9000 + 11 * BLOCK - 1))))
    output = scheduler.schedule()
    plain = scheduler.kv_cache_manager.get_block_ids("plain")[0]
    assert set(stored) <= set(plain)  # the whole pool: the stored prefix's blocks were evicted for it
    zeroed = bias_blocks_to_zero(output, {"compacting": stored})
    assert set(plain) <= set(zeroed)
