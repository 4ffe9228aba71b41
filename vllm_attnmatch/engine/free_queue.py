"""Eviction order of vLLM's free-block queue for compacted prefixes (scheduler process; vLLM glue).

vLLM keeps every free block in one LRU queue (``BlockPool.free_block_queue``): unhashed blocks at the
front, cached ones appended at the tail when freed, reuse from the front. Two plugin rules change that
order, and this module is the only place that touches the queue:

- :func:`evict_first`: the raw (token-hash) source blocks of a compacted request go to the *front*. Their
  hashes are kept, not dropped: until the pool needs them, a request without ``am_*`` keys asking the
  same document still gets ordinary prefix-cache hits; but they are the first blocks reused, so a new
  document's prefill takes them instead of the small compacted prefixes, which are the point.
- :class:`PinnedLastFreeQueue`: a second, last-resort segment behind the queue for pinned compacted
  prefixes. Pinned blocks still count as free and are handed out when nothing else is left, so a pin never
  refuses, delays or preempts a live request; it only makes every other free block go first.

vLLM exposes no hook for either (its queue is built by ``BlockPool.__init__``), so the store installs the
queue on the pool (:func:`install`), and the install refuses a vLLM whose queue has methods this one does
not route.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue, KVCacheBlock

#: The public methods of vLLM 0.32's FreeKVCacheBlockQueue, all of which PinnedLastFreeQueue implements.
ROUTED_METHODS = frozenset(
    {"popleft", "popleft_n", "remove", "append", "append_n", "prepend_n", "get_all_free_blocks", "iter_blocks_after"}
)


def evict_first(pool, blocks: Iterable[KVCacheBlock]) -> None:
    """Move free ``blocks`` to the front of the pool's free queue, the first of them reused first."""
    queue = pool.free_block_queue
    moved = [b for b in blocks if b.prev_free_block is not None]  # in a queue: free
    for block in moved:
        queue.remove(block)
    queue.prepend_n(moved)


class PinnedLastFreeQueue:
    """vLLM's free queue (``main``) followed by a last-resort segment (``kept``) for pinned blocks.

    ``pinned`` holds the ids of blocks that wait in ``kept`` whenever they are free; :meth:`pin` and
    :meth:`unpin` change it and move blocks that are free now. ``on_pop`` sees every block handed out,
    before the pool drops its hashes (the prefix store counts evictions there)."""

    def __init__(self, blocks: list[KVCacheBlock]) -> None:
        self.main = FreeKVCacheBlockQueue(blocks)
        self.kept = FreeKVCacheBlockQueue([])
        self.pinned: set[int] = set()
        self._in_kept: set[int] = set()
        self.on_pop: Callable[[list[KVCacheBlock]], None] | None = None
        # Called with how many pinned blocks are about to be handed out (the main segment ran dry), so
        # the owner can unpin the prefixes it values least first; what is still short comes from ``kept``.
        self.on_short: Callable[[int], None] | None = None

    @property
    def num_free_blocks(self) -> int:
        return self.main.num_free_blocks + self.kept.num_free_blocks

    # -- vLLM's queue interface -----------------------------------------------------------------------

    def popleft(self) -> KVCacheBlock:
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        take = min(n, self.main.num_free_blocks)
        blocks = self.main.popleft_n(take)
        if n > take and self.on_short is not None:
            self.on_short(n - take)
            more = min(n - take, self.main.num_free_blocks)
            blocks += self.main.popleft_n(more)
            take += more
        if n > take:
            if n - take > self.kept.num_free_blocks:
                raise ValueError("No free blocks available")
            last = self.kept.popleft_n(n - take)
            self._in_kept.difference_update(b.block_id for b in last)
            blocks += last
        if self.on_pop is not None and blocks:
            self.on_pop(blocks)
        return blocks

    def remove(self, block: KVCacheBlock) -> None:
        if block.block_id in self._in_kept:
            self._in_kept.discard(block.block_id)
            self.kept.remove(block)
        else:
            self.main.remove(block)

    def append(self, block: KVCacheBlock) -> None:
        self.append_n([block])

    def append_n(self, blocks: list[KVCacheBlock]) -> None:
        main, kept = self._split(blocks)
        self.main.append_n(main)
        self.kept.append_n(kept)

    def prepend_n(self, blocks: list[KVCacheBlock]) -> None:
        main, kept = self._split(blocks)
        self.main.prepend_n(main)
        self.kept.prepend_n(kept)

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        return self.main.get_all_free_blocks() + self.kept.get_all_free_blocks()

    def iter_blocks_after(self, cursor: KVCacheBlock | None) -> Iterator[KVCacheBlock]:
        if cursor is not None and cursor.block_id in self._in_kept:
            yield from self.kept.iter_blocks_after(cursor)
            return
        yield from self.main.iter_blocks_after(cursor)
        yield from self.kept.iter_blocks_after(None)

    # -- pins -----------------------------------------------------------------------------------------

    def pin(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Reuse these blocks last from now on; free ones move to the tail of the kept segment."""
        for block in blocks:
            self.pinned.add(block.block_id)
            if block.prev_free_block is not None and block.block_id not in self._in_kept:
                self.main.remove(block)
                self.append(block)

    def unpin(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Back to plain LRU order; free ones move to the tail of the main segment."""
        for block in blocks:
            self.pinned.discard(block.block_id)
            if block.block_id in self._in_kept:
                self.remove(block)
                self.main.append(block)

    def num_kept_free(self, blocks: Iterable[KVCacheBlock]) -> int:
        """How many of ``blocks`` wait free in the kept segment (what unpinning them gives the main one)."""
        return sum(1 for block in blocks if block.block_id in self._in_kept)

    def _split(self, blocks: list[KVCacheBlock]) -> tuple[list[KVCacheBlock], list[KVCacheBlock]]:
        if not self.pinned:
            return blocks, []
        main, kept = [], []
        for block in blocks:
            (kept if block.block_id in self.pinned else main).append(block)
        self._in_kept.update(b.block_id for b in kept)
        return main, kept


def install(pool) -> PinnedLastFreeQueue:
    """The pool's queue as a :class:`PinnedLastFreeQueue` (idempotent; the free blocks keep their order)."""
    queue = pool.free_block_queue
    if isinstance(queue, PinnedLastFreeQueue):
        return queue
    if type(queue) is not FreeKVCacheBlockQueue:
        raise RuntimeError(f"vllm-attnmatch expects vLLM's FreeKVCacheBlockQueue in the block pool, got {type(queue).__name__}")
    unrouted = {n for n in dir(FreeKVCacheBlockQueue) if not n.startswith("_") and callable(getattr(queue, n))}
    unrouted -= ROUTED_METHODS
    if unrouted:
        raise RuntimeError(
            "vllm-attnmatch does not know these FreeKVCacheBlockQueue methods of this vLLM version: "
            + ", ".join(sorted(unrouted))
        )
    pool.free_block_queue = PinnedLastFreeQueue(queue.get_all_free_blocks())
    return pool.free_block_queue
