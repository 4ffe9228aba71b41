"""Block accounting for compacted requests (scheduler process).

vLLM sizes a request's block list from its *logical* token count. After a compaction a request holds
``offset`` fewer KV entries than it has tokens, so this manager subtracts the offset wherever slots are
counted, swaps the request's blocks for the compacted ones, and never registers compacted blocks
under token hashes (that would serve compacted KV to requests that asked for the exact prefix). The
raw blocks a compaction replaces are freed to be reused first (see ``replace_blocks``).

Selected through vLLM's ``KVCacheSpecRegistry``: the attention backend reports
:class:`AttnMatchFullAttentionSpec` for its layers and the registry maps it to this manager.
"""

from __future__ import annotations

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from vllm_attnmatch.contract.kv_spec import AttnMatchFullAttentionSpec
from vllm_attnmatch.engine.free_queue import evict_first
from vllm_attnmatch.engine.prefix_store import is_compacted


class AttnMatchFullAttentionManager(FullAttentionManager):
    """FullAttentionManager that counts physical slots (logical length minus the request's offset)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # req_id -> logical - physical length; present only for compacted requests.
        self.offsets: dict[str, int] = {}

    def get_num_blocks_to_allocate(
        self,
        request_id,
        num_tokens,
        new_computed_blocks,
        total_computed_tokens,
        num_local_computed_tokens,
        num_tokens_main_model,
        apply_admission_cap=False,
        prefill_end=0,
    ):
        off = self.offsets.get(request_id, 0)
        return super().get_num_blocks_to_allocate(
            request_id,
            num_tokens - off,
            new_computed_blocks,
            total_computed_tokens - off,
            num_local_computed_tokens - off if num_local_computed_tokens >= off else num_local_computed_tokens,
            num_tokens_main_model - off,
            apply_admission_cap=apply_admission_cap,
            prefill_end=prefill_end,
        )

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        off = self.offsets.get(request_id, 0)
        return super().allocate_new_blocks(request_id, num_tokens - off, num_tokens_main_model - off)

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries):
        if request.request_id in self.offsets:
            return  # compacted KV must never be published under token hashes
        return super().cache_blocks(
            request, num_tokens, retention_interval, replay_boundaries=replay_boundaries
        )

    def replace_blocks(self, request_id: str, new_blocks: list, offset: int) -> list:
        """Make ``new_blocks`` the request's blocks and free the old ones, raw ones to be reused first.

        The raw (token-hash) old blocks keep their hashes, so a request without ``am_*`` keys can still
        hit them, but they go to the *front* of the free queue: the next prefill takes them, not the
        compacted prefixes, which hold the same document in ~ratio of the blocks and cost a prefill and
        a compaction to rebuild. Dropping the hashes would evict them no sooner and lose those hits.
        """
        old = self.req_to_blocks[request_id]
        self.req_to_blocks[request_id] = list(new_blocks)
        self.num_cached_block[request_id] = len(new_blocks)
        self.offsets[request_id] = offset
        self.block_pool.free_blocks(reversed(old))
        raw = [b for b in reversed(old) if b.ref_cnt == 0 and b.block_hash is not None and not is_compacted(b)]
        evict_first(self.block_pool, raw)  # tail blocks first: a prefix hit needs the chain's head
        return old

    def adopt_blocks(self, request_id: str, holder: str, offset: int) -> tuple[list, list]:
        """Make the blocks held under ``holder`` (a job's destination, see ``allocation``) the request's
        blocks and free its old ones; return (old, new)."""
        new = super().pop_blocks_for_free(holder)
        return self.replace_blocks(request_id, new, offset), new

    def pop_blocks_for_free(self, request_id):
        # Finish, abort and preemption all come through here: the compaction dies with the blocks.
        self.offsets.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def register_kv_cache_spec() -> None:
    """Map our spec to our manager (idempotent). Built-ins first: the registry only registers them
    while it is empty, and registering ours first would leave FullAttentionSpec without a manager."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        AttnMatchFullAttentionSpec,
        AttnMatchFullAttentionManager,
        uniform_type_base_spec=FullAttentionSpec,
    )
