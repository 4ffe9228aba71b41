"""Compacted prefixes kept in vLLM's own block pool: ingest a document once, reuse it many times.

A compacted prefix is a run of whole blocks (see ``jobs.CompactionLayout``) that depends only on the
prompt's first ``span_end`` tokens and on the compaction parameters. We register those blocks in the
pool's prefix-cache map under *synthetic* keys, so the pool governs their lifetime like that of ordinary
cached blocks, and a later request asking for the same compaction of the same prefix can take them
instead of prefilling and compacting again.

Keys: ``attnmatch:`` + sha256(chained token hash of the prefix ‖ parameters ‖ block index). The chained
token hash already covers ``cache_salt``, LoRA and multimodal inputs; the parameters cover every setting
that changes the result, plus the model and the plugin version. Token-hash keys are bare digests (32
bytes or less) and ours are longer and prefixed, so the two can never collide.

Eviction order (see ``free_queue``): a compacted prefix replaces ~1/ratio raw blocks and a prefill plus a
compaction, so it is worth far more per block than a raw cached block. Up to ``pin_share`` of the pool,
prefixes are *pinned*: they are reused only after every other free block, so a server that also serves
plain requests keeps their prefix cache beside them. Which prefixes hold the pins is decided like
TinyLFU's admission: every request counts one ask for the prefix it wants (hit or miss; counts are halved
now and then, so old fame fades), and a prefix that does not fit takes the pins of the least recently
used ones only if it was asked more often than each of them. Plain LRU would thrash when documents are
asked round-robin and their prefixes do not all fit: each one would push out the next one asked, and
nothing would ever be hit. A prefix that loses one block is useless: it is counted as evicted
(``prefix_evictions``) and its other blocks are freed for reuse first.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict

from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

from vllm_attnmatch.contract.jobs import CompactionLayout
from vllm_attnmatch.engine import free_queue

KEY_PREFIX = b"attnmatch:"


def is_compacted(block) -> bool:
    """Whether a cached block holds compacted KV (its key is one of ours)."""
    return block.block_hash is not None and bytes(block.block_hash).startswith(KEY_PREFIX)


class CompactedPrefixStore:
    def __init__(
        self, block_pool, block_size: int, kv_cache_group_id: int, salt: str, pin_share: float = 0.0, stats=None
    ) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.group_id = kv_cache_group_id
        self.salt = salt.encode()
        if block_size % block_pool.hash_block_size:
            raise ValueError(
                f"block size {block_size} is not a multiple of the hash block size {block_pool.hash_block_size}"
            )
        self.queue = free_queue.install(block_pool)
        self.queue.on_pop = self._reused
        self.queue.on_short = self._shed
        self.pin_budget = int(pin_share * (block_pool.num_gpu_blocks - 1))  # in blocks, minus the null block
        self.stats = stats  # a metrics.CompactionStats, or None
        self._stored: dict[bytes, list] = {}  # prefix key -> its blocks (KVCacheBlock), in prefix order
        self._owner: dict[int, bytes] = {}  # block id -> prefix key
        self._pinned: OrderedDict[bytes, int] = OrderedDict()  # prefix key -> blocks; least recently used first
        self._pinned_blocks = 0
        self._asks: Counter[bytes] = Counter()  # prefix key -> requests that asked for it (halved now and then)
        self._asks_since_halving = 0
        # Halving after this many asks bounds the counter and lets a new working set take over the pins.
        self.halving_period = min(max(64, 4 * self.pin_budget), 16384)

    def prefix_key(self, request, layout: CompactionLayout, params_key: str) -> bytes | None:
        """Identity of the compacted prefix this request would produce, or None if its tokens are not
        hashed that far (prefix caching off)."""
        index = layout.span_end // self.block_pool.hash_block_size - 1
        if index < 0 or index >= len(request.block_hashes):
            return None
        geometry = f"{layout.keep_first}:{layout.span_end}:{layout.target}:{layout.pad}".encode()
        digest = hashlib.sha256(bytes(request.block_hashes[index]) + b"|" + geometry + b"|" + params_key.encode())
        digest.update(b"|" + self.salt)
        return digest.digest()

    def _block_key(self, prefix_key: bytes, index: int):
        block_hash = KEY_PREFIX + hashlib.sha256(prefix_key + index.to_bytes(4, "big")).digest()
        return make_block_hash_with_group_id(block_hash, self.group_id)

    def store(self, prefix_key: bytes, blocks: list) -> None:
        """Publish the blocks of a freshly compacted prefix under their synthetic keys, pinned if the
        budget allows.

        Whatever is left of an older compaction under the same key (the pool evicted some of its
        blocks, so it was recomputed) is evicted first: a lookup must never mix blocks of two
        compactions (each fit is its own; their entries do not line up)."""
        self.evict(prefix_key, len(blocks))
        for index, block in enumerate(blocks):
            self.block_pool._insert_block_hash(self._block_key(prefix_key, index), block, num_tokens=None)
            self._owner[block.block_id] = prefix_key
        self._stored[prefix_key] = list(blocks)
        self._use(prefix_key)

    def evict(self, prefix_key: bytes, num_blocks: int) -> int:
        """Drop every block cached under this prefix's keys from the prefix cache (blocks in use stay
        allocated to their requests); return how many were dropped."""
        if prefix_key in self._stored:
            self._forget(prefix_key)
        cache, dropped = self.block_pool.cached_block_hash_to_block, 0
        for index in range(num_blocks):
            key = self._block_key(prefix_key, index)
            seen: set[int] = set()
            while (block := cache.get_one_block(key)) is not None and block.block_id not in seen:
                seen.add(block.block_id)
                self.block_pool.evict_blocks({block.block_id})
                dropped += 1
        return dropped

    def lookup(self, prefix_key: bytes, num_blocks: int) -> list | None:
        """The stored blocks of a compacted prefix, or None unless every one of them is still cached.
        A found prefix counts as used (it moves to the most recently used end of the pins)."""
        blocks = []
        for index in range(num_blocks):
            block = self.block_pool.cached_block_hash_to_block.get_one_block(self._block_key(prefix_key, index))
            if block is None:
                if index < len(self._stored.get(prefix_key, ())):
                    self._evicted(prefix_key)  # lost a block outside the queue (e.g. a prefix-cache reset)
                return None
            blocks.append(block)
        if prefix_key in self._stored:
            self._use(prefix_key)
        return blocks

    def asked(self, prefix_key: bytes | None) -> None:
        """A request wants this prefix (once per request, found or not): the frequency that decides which
        prefixes hold the pins."""
        if prefix_key is None:
            return
        self._asks[prefix_key] += 1
        self._asks_since_halving += 1
        if self._asks_since_halving >= self.halving_period:
            self._asks = Counter({key: n // 2 for key, n in self._asks.items() if n // 2})
            self._asks_since_halving = 0

    # -- pins and evictions ---------------------------------------------------------------------------

    def _use(self, prefix_key: bytes) -> None:
        """Most recently used now. Pin it if it fits, or if it was asked more often than every least
        recently used pinned prefix whose pin it needs; otherwise it waits in plain LRU order."""
        if prefix_key in self._pinned:
            self._pinned.move_to_end(prefix_key)
            return
        blocks = self._stored[prefix_key]
        if len(blocks) > self.pin_budget:
            return
        victims, room = [], self.pin_budget - self._pinned_blocks
        for key, size in self._pinned.items():  # least recently used first
            if room >= len(blocks):
                break
            victims.append(key)
            room += size
        if any(self._asks[key] >= self._asks[prefix_key] for key in victims):
            return
        for key in victims:
            self._unpin(key)
        self._pinned[prefix_key] = len(blocks)
        self._pinned_blocks += len(blocks)
        self.queue.pin(blocks)

    def _shed(self, num_blocks: int) -> None:
        """The pool needs ``num_blocks`` pinned blocks: unpin the least asked prefixes until it has them,
        the most recently pinned first among equals. With documents asked round-robin the newest one is
        asked again last, so the pins the older ones hold keep paying (the oldest would be the very next
        one asked: LRU here thrashes as it would at admission)."""
        pinned_at = {key: i for i, key in enumerate(self._pinned)}
        for victim in sorted(self._pinned, key=lambda key: (self._asks[key], -pinned_at[key])):
            if num_blocks <= 0:
                break
            num_blocks -= self.queue.num_kept_free(self._stored[victim])
            self._unpin(victim)

    def _unpin(self, prefix_key: bytes) -> None:
        self._pinned_blocks -= self._pinned.pop(prefix_key)
        self.queue.unpin(self._stored[prefix_key])

    def _forget(self, prefix_key: bytes) -> list:
        if prefix_key in self._pinned:
            self._unpin(prefix_key)
        blocks = self._stored.pop(prefix_key)
        for block in blocks:
            if self._owner.get(block.block_id) == prefix_key:
                del self._owner[block.block_id]
        return blocks

    def _evicted(self, prefix_key: bytes) -> None:
        """One block is gone, so the prefix is: count it, and make its other blocks the next reused."""
        blocks = self._forget(prefix_key)
        if self.stats is not None:
            self.stats.add("prefix_evictions")
        self.block_pool.evict_blocks({b.block_id for b in blocks})
        free_queue.evict_first(self.block_pool, blocks)

    def _reused(self, blocks: list) -> None:
        """The queue handed these blocks out (before the pool drops their keys)."""
        for block in blocks:
            prefix_key = self._owner.get(block.block_id)
            if prefix_key is not None:
                self._evicted(prefix_key)
