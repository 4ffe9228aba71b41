"""Compacted prefixes kept in vLLM's own block pool: ingest a document once, reuse it many times.

A compacted prefix is a run of whole blocks (see ``jobs.CompactionLayout``) that depends only on the
prompt's first ``span_end`` tokens and on the compaction parameters. We register those blocks in the
pool's prefix-cache map under *synthetic* keys, so the pool's LRU governs their lifetime exactly like
ordinary cached blocks, and a later request asking for the same compaction of the same prefix can take
them instead of prefilling and compacting again.

Keys: ``attnmatch:`` + sha256(chained token hash of the prefix ‖ parameters ‖ block index). The chained
token hash already covers ``cache_salt``, LoRA and multimodal inputs; the parameters cover every setting
that changes the result, plus the model and the plugin version. Token-hash keys are bare digests (32
bytes or less) and ours are longer and prefixed, so the two can never collide.
"""

from __future__ import annotations

import hashlib

from vllm.v1.core.kv_cache_utils import make_block_hash_with_group_id

from vllm_attnmatch.engine.jobs import CompactionLayout

KEY_PREFIX = b"attnmatch:"


class CompactedPrefixStore:
    def __init__(self, block_pool, block_size: int, kv_cache_group_id: int, salt: str) -> None:
        self.block_pool = block_pool
        self.block_size = block_size
        self.group_id = kv_cache_group_id
        self.salt = salt.encode()
        if block_size % block_pool.hash_block_size:
            raise ValueError(
                f"block size {block_size} is not a multiple of the hash block size {block_pool.hash_block_size}"
            )

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
        """Publish the blocks of a freshly compacted prefix under their synthetic keys.

        Whatever is left of an older compaction under the same key (the pool evicted some of its
        blocks, so it was recomputed) is evicted first: a lookup must never mix blocks of two
        compactions (each fit is its own; their entries do not line up)."""
        self.evict(prefix_key, len(blocks))
        for index, block in enumerate(blocks):
            self.block_pool._insert_block_hash(self._block_key(prefix_key, index), block, num_tokens=None)

    def evict(self, prefix_key: bytes, num_blocks: int) -> int:
        """Drop every block cached under this prefix's keys from the prefix cache (blocks in use stay
        allocated to their requests); return how many were dropped."""
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
        """The stored blocks of a compacted prefix, or None unless every one of them is still cached."""
        blocks = []
        for index in range(num_blocks):
            block = self.block_pool.cached_block_hash_to_block.get_one_block(self._block_key(prefix_key, index))
            if block is None:
                return None
            blocks.append(block)
        return blocks
