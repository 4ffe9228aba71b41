"""Compacted prefixes survive memory pressure (issue 19 §1), on vLLM's real scheduler, KV-cache manager and
block pool: the raw source blocks of a compacted request are reused first, pinned compacted prefixes
last, and every compacted prefix the pool evicts is counted.

Compactions are driven through the scheduler's real ``schedule`` / ``update_from_output``; only the
worker is stood in for (it reports each job done on the step its layers run, writing no KV)."""

from __future__ import annotations

import pytest
from stand_in_worker import StandInWorker

from vllm_attnmatch.engine.prefix_store import is_compacted
from vllm_attnmatch.ipc.metrics import CompactionStats

BLOCK = 16
DOC_TOKENS = 17 * BLOCK  # the issue's ~17 raw blocks per document; 2 blocks once compacted at am_ratio 0.1
QUESTIONS = ([7] * 8, [8] * 8, [9] * 8)


def _document(i: int) -> list[int]:
    return list(range(1000 + 1000 * i, 1000 + 1000 * i + DOC_TOKENS))


def _serve(scheduler, request) -> list:
    """Run one request to its end, one engine step at a time (requests arrive one after the other);
    return the compaction jobs it shipped."""
    scheduler.add_request(request)
    worker = StandInWorker()
    jobs = []
    for _ in range(100):
        if request.is_finished():
            return jobs
        jobs += worker.step(scheduler)[1].jobs
    raise AssertionError(f"request {request.request_id} did not finish")


def _round_robin(scheduler, make_request, documents: int) -> float:
    """The issue's workload: each document asked its questions round-robin; returns the prefix hits."""
    for round_, question in enumerate(QUESTIONS):
        for d in range(documents):
            _serve(scheduler, make_request(f"doc{d}-q{round_}", _document(d) + question, am_ratio=0.1))
    return scheduler.am_stats.values["prefix_hits"]


def _raw_prefill(scheduler, make_request, req_id: str, num_blocks: int) -> None:
    """A request without am_* keys whose prompt fills ``num_blocks`` blocks (its blocks stay cached)."""
    start = 100_000 + 10_000 * int(req_id.rsplit("-", 1)[-1])
    _serve(scheduler, make_request(req_id, list(range(start, start + num_blocks * BLOCK - 8))))


@pytest.mark.parametrize("pin_share", [None, 0.0], ids=["default-pins", "no-pins"])
def test_compacted_prefixes_survive_a_pool_filled_by_raw_prefills_round_robin(
    make_scheduler, make_request, engine_config, monkeypatch, pin_share
):
    # 47 usable blocks hold two raw documents (17 blocks each), not three: every new document's prefill
    # needs fresh blocks. Six compacted documents take 12: all of them fit beside one prefill. Without
    # pins, evicting the raw sources first is enough.
    if pin_share is not None:
        monkeypatch.setitem(engine_config.additional_config, "attnmatch", {"prefix_pin_share": pin_share})
    scheduler = make_scheduler(num_blocks=48)
    hits = _round_robin(scheduler, make_request, documents=6)
    stats = scheduler.am_stats.values
    assert stats["prefill_compactions"] == 6  # each document compacted once...
    assert hits == 12  # ...and every later question reused its compacted prefix
    assert stats["prefix_evictions"] == 0


def test_the_raw_source_of_a_compacted_request_is_reused_first_and_stays_cached(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=48)
    _raw_prefill(scheduler, make_request, "plain-1", 5)  # raw cached blocks freed before the compaction
    (job,) = _serve(scheduler, make_request("doc0", _document(0) + QUESTIONS[0], am_ratio=0.1))
    queue = scheduler.kv_cache_manager.block_pool.free_block_queue.get_all_free_blocks()
    cached = [b.block_id for b in queue if b.block_hash is not None and not is_compacted(b)]
    source = [i for i in cached if i in job.src_block_ids]
    assert len(source) >= 16 and len(cached) > len(source)  # (vLLM leaves the 17th uncached)
    assert cached[: len(source)] == source  # the document's raw blocks go before older raw cached blocks
    # Still cached: a request without am_* keys asking the same document gets an ordinary hit.
    _, hit_tokens, _ = scheduler.kv_cache_manager.get_computed_blocks(make_request("plain-doc0", _document(0) + [3] * 8))
    assert hit_tokens == len(source) * BLOCK


def test_pinned_compacted_prefixes_outlive_raw_cached_blocks_of_plain_requests(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=48)
    for d in range(3):
        _serve(scheduler, make_request(f"doc{d}", _document(d) + QUESTIONS[0], am_ratio=0.1))
    for i in range(4):  # plain requests, 40 blocks each: each one cycles nearly the whole pool
        _raw_prefill(scheduler, make_request, f"plain-{i}", 40)
    for d in range(3):
        _serve(scheduler, make_request(f"doc{d}-again", _document(d) + QUESTIONS[1], am_ratio=0.1))
    assert scheduler.am_stats.values["prefix_hits"] == 3
    assert scheduler.am_stats.values["prefix_evictions"] == 0
    # Pinned blocks still count as free: the pool is whole once every request is done.
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_a_pinned_prefix_is_reused_only_when_nothing_else_is_free_and_its_eviction_is_counted(make_scheduler, make_request):
    scheduler = make_scheduler(num_blocks=48)
    _serve(scheduler, make_request("doc0", _document(0) + QUESTIONS[0], am_ratio=0.1))
    _raw_prefill(scheduler, make_request, "plain-1", 45)  # 45 of 47: the 2 pinned blocks are left
    assert scheduler.am_stats.values["prefix_evictions"] == 0
    _raw_prefill(scheduler, make_request, "plain-2", 47)  # the whole pool: the pin gives way, no refusal
    assert scheduler.am_stats.values["prefix_evictions"] == 1  # one prefix, counted once (not per block)
    _serve(scheduler, make_request("doc0-again", _document(0) + QUESTIONS[1], am_ratio=0.1))
    assert scheduler.am_stats.values["prefix_hits"] == 0
    assert scheduler.am_stats.values["prefill_compactions"] == 2  # recompacted


# -- the pin budget, on the store and the pool alone -------------------------------------------------


def _store(pin_share: float, num_blocks: int = 21):
    from vllm.v1.core.block_pool import BlockPool

    from vllm_attnmatch.engine.prefix_store import CompactedPrefixStore

    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=BLOCK)
    stats = CompactionStats()
    return pool, CompactedPrefixStore(pool, BLOCK, 0, salt="test", pin_share=pin_share, stats=stats), stats


def _publish(pool, store, key: bytes, num_blocks: int) -> list:
    blocks = pool.get_new_blocks(num_blocks)
    store.store(key, blocks)
    pool.free_blocks(reversed(blocks))
    return blocks


def _asked_and_published(pool, store, key: bytes, num_blocks: int, asks: int = 1) -> list:
    for _ in range(asks):
        store.asked(key)
    return _publish(pool, store, key, num_blocks)


def test_a_prefix_asked_more_often_takes_the_pin_of_the_least_recently_used_one():
    pool, store, stats = _store(pin_share=0.2)  # 20 usable blocks: 4 may be pinned, two 2-block prefixes
    a = _asked_and_published(pool, store, b"a", 2)
    b = _asked_and_published(pool, store, b"b", 2)
    store.asked(b"a")
    assert store.lookup(b"a", 2) is not None  # "a" used again: "b" is now the least recently used pin
    c = _asked_and_published(pool, store, b"c", 2)  # over budget, asked as often as "b": not pinned
    assert store.queue.pinned == {blk.block_id for blk in a + b}
    store.asked(b"c")
    assert store.lookup(b"c", 2) is not None  # asked twice now, more than "b": "b" back to plain LRU order
    pinned = {blk.block_id for blk in a + c}
    assert store.queue.pinned == pinned
    # Plain blocks cached after them are reused first; "b", unpinned, goes with them.
    raw = pool.get_new_blocks(10)
    for i, blk in enumerate(raw):
        pool._insert_block_hash(bytes([i]) * 36, blk, num_tokens=BLOCK)  # token-hash keys of a raw prefill
    pool.free_blocks(reversed(raw))
    order = [blk.block_id for blk in pool.free_block_queue.get_all_free_blocks()]
    assert set(order[-4:]) == pinned  # the last four reused
    pool.get_new_blocks(16)  # everything but the pinned blocks
    assert store.lookup(b"b", 2) is None and stats.values["prefix_evictions"] == 1
    assert store.lookup(b"a", 2) is not None and store.lookup(b"c", 2) is not None


def test_documents_asked_round_robin_that_do_not_all_fit_keep_most_of_their_pins(make_scheduler, make_request):
    """The round-robin workload at r = 0.25 in a 40-block pool: six 4-block compacted documents and one raw
    prefill do not fit. Plain LRU pins thrash (each document pushes out the next one asked: 0 hits); the
    pins held by the first documents stay, because a newcomer was never asked more often."""
    scheduler = make_scheduler(num_blocks=40)
    for round_, question in enumerate(QUESTIONS):
        for d in range(6):
            document = list(range(1000 + 1000 * d, 1000 + 1000 * d + 16 * BLOCK))
            _serve(scheduler, make_request(f"doc{d}-q{round_}", document + question, am_ratio=0.25))
    stats = scheduler.am_stats.values
    assert stats["prefix_hits"] == 8  # four pinned documents hit in each later round
    assert stats["prefill_compactions"] == 10  # the other two are recomputed


def test_when_a_prefill_needs_pinned_blocks_the_newest_of_the_least_asked_prefixes_goes_first(
    make_scheduler, make_request, engine_config, monkeypatch
):
    """The served r = 0.25 workload's geometry (chunked prefills, keep_first 4 / keep_last 16; five
    documents compact to 5 blocks, one to 4): the pins fill their 19 blocks, and a new document's prefill
    and destination (22 blocks) need 3 of them. Handed out in queue order, the pins of the document asked
    next go, every round (0 hits); unpinning the newest least-asked prefix first keeps the three others."""
    monkeypatch.setitem(engine_config.additional_config, "attnmatch", {"keep_first": 4, "keep_last": 16})
    monkeypatch.setattr(engine_config.scheduler_config, "max_num_batched_tokens", 4 * BLOCK)
    scheduler = make_scheduler(num_blocks=40)
    for round_ in range(3):
        for d in range(6):
            document = list(range(1000 + 1000 * d, 1000 + 1000 * d + (12 if d == 4 else 16) * BLOCK + 12))
            request = make_request(f"doc{d}-q{round_}", document + [7 + round_] * 8, max_tokens=8, am_ratio=0.3)
            _serve(scheduler, request)
    assert scheduler.am_stats.values["prefix_hits"] == 6  # three documents hit in each later round


def test_a_zero_pin_share_keeps_plain_lru_order():
    pool, store, _ = _store(pin_share=0.0)
    blocks = _publish(pool, store, b"a", 2)
    assert not store.queue.pinned
    assert store.queue.kept.num_free_blocks == 0
    assert {b.block_id for b in pool.free_block_queue.get_all_free_blocks()[-2:]} == {b.block_id for b in blocks}


def test_an_evicted_prefix_is_counted_once_and_its_other_blocks_are_reused_first():
    pool, store, stats = _store(pin_share=0.0)
    raw = pool.get_new_blocks(10)
    for i, blk in enumerate(raw):
        pool._insert_block_hash(bytes([i]) * 36, blk, num_tokens=BLOCK)
    pool.free_blocks(reversed(raw))
    blocks = _publish(pool, store, b"a", 3)  # behind the raw blocks in LRU order
    pool.evict_blocks({blocks[1].block_id})  # one block lost (here outside the queue)
    assert store.lookup(b"a", 3) is None and stats.values["prefix_evictions"] == 1
    assert store.lookup(b"a", 3) is None and stats.values["prefix_evictions"] == 1  # counted once
    queue = pool.free_block_queue.get_all_free_blocks()
    assert [b.block_id for b in queue[:3]] == [b.block_id for b in blocks]  # useless now: the next reused
    assert all(b.block_hash is None for b in queue[:3])


def test_prefix_pin_share_is_a_validated_share_of_the_pool():
    from vllm_attnmatch.config import ConfigError, ServerConfig, parse_server_config

    assert ServerConfig().prefix_pin_share == 0.5
    assert parse_server_config({"prefix_pin_share": 0}).prefix_pin_share == 0.0
    for bad in (1.5, -0.1, "half"):
        with pytest.raises(ConfigError, match="prefix_pin_share"):
            parse_server_config({"prefix_pin_share": bad})
