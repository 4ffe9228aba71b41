"""Destination blocks of a compaction job, allocated through the KV manager and its reservations.

A job writes into fresh blocks (never in place) and holds them for several steps while its layer slices
run, with no forward progress of its own, like vLLM's async KV loads. So it is admitted the way vLLM
admits those (``Scheduler`` passes ``reserved_blocks = _inflight_prefill_reserved_blocks()`` to
``allocate_slots``): only if it fits in the free blocks minus what in-flight prefills still need and minus
the manager's watermark. The blocks are allocated by the single-type manager under a holder id of the
job (``allocate_new_blocks``: the manager's own accounting and β-zeroing list see them) and either become
the request's blocks (``AttnMatchFullAttentionManager.adopt_blocks``) or go back through the manager's
``free``.
"""

from __future__ import annotations

from vllm_attnmatch.contract.jobs import cdiv

HOLDER_PREFIX = "attnmatch-dst:"


def holder_id(req_id: str) -> str:
    return HOLDER_PREFIX + req_id


class DestinationAllocator:
    def __init__(self, kv_cache_manager, am_manager, block_size: int) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.am_manager = am_manager
        self.block_size = block_size

    def reserve(self, req_id: str, physical_len: int, reserved_blocks: int) -> tuple[str, list] | None:
        """Blocks for ``physical_len`` entries held under the job's holder id, or None if they do not
        fit beside the reservations of in-flight prefills (``reserved_blocks``) and the watermark."""
        num_blocks = cdiv(physical_len, self.block_size)
        available = (
            self.kv_cache_manager.block_pool.get_num_free_blocks()
            - reserved_blocks
            - self.kv_cache_manager.watermark_blocks
        )
        if num_blocks > available:
            return None
        holder = holder_id(req_id)
        tokens = num_blocks * self.block_size
        blocks = self.am_manager.allocate_new_blocks(holder, tokens, tokens)
        return holder, list(blocks)

    def release(self, holder: str) -> None:
        """Give a failed or cancelled job's destination blocks back to the pool."""
        self.am_manager.free(holder)
