"""The compacted-prefix store on vLLM's real block pool: a prefix recompacted after a partial eviction
replaces the old blocks instead of mixing with them."""

from __future__ import annotations

from vllm.v1.core.block_pool import BlockPool

from vllm_attnmatch.engine.prefix_store import CompactedPrefixStore


def _store(num_blocks=16):
    pool = BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=16)
    return pool, CompactedPrefixStore(pool, block_size=16, kv_cache_group_id=0, salt="test")


def test_a_recompacted_prefix_never_mixes_with_what_is_left_of_an_older_one():
    pool, store = _store()
    key = b"prefix-key"
    old = pool.get_new_blocks(3)
    store.store(key, old)
    assert [b.block_id for b in store.lookup(key, 3)] == [b.block_id for b in old]
    pool.free_blocks(reversed(old))
    pool.evict_blocks({old[1].block_id})  # the pool evicts one block of it (LRU): the prefix is incomplete
    assert store.lookup(key, 3) is None
    new = pool.get_new_blocks(3)  # the request compacts again and publishes its own blocks
    store.store(key, new)
    assert [b.block_id for b in store.lookup(key, 3)] == [b.block_id for b in new]


def test_evict_drops_only_this_prefix():
    pool, store = _store()
    a, b = pool.get_new_blocks(2), pool.get_new_blocks(2)
    store.store(b"a", a)
    store.store(b"b", b)
    assert store.evict(b"a", 2) == 2
    assert store.lookup(b"a", 2) is None and store.lookup(b"b", 2) is not None
