"""Admission: does a new request compact, with which layout, and which compacted prefix can it start from.

The counterpart of vLLM's ``get_computed_blocks`` family for compacting requests: their own prefix-cache
hits are replaced by a stored *compacted* prefix (they need every prefix token's query if they compact
themselves). The search for a stored prefix runs once per request life; a request that waits several
steps for admission only re-checks that the blocks it found are still cached. Hits and misses are counted
by the scheduler once the request is actually admitted. Policy (which request runs next) stays vLLM's.
"""

from __future__ import annotations

from vllm.logger import init_logger

from vllm_attnmatch.config import ConfigError, EffectiveParams, ServerConfig, effective_params, parse_request_params
from vllm_attnmatch.contract.jobs import CompactionLayout
from vllm_attnmatch.engine.head_budgets import HeadBudgetPlan
from vllm_attnmatch.engine.layouts import layout_for_span, plan_layout, widen_layout
from vllm_attnmatch.engine.prefix_store import CompactedPrefixStore
from vllm_attnmatch.engine.request_state import RequestCompaction

logger = init_logger("vllm.attnmatch.scheduler")


class Admission:
    def __init__(
        self, settings: ServerConfig, block_size: int, store: CompactedPrefixStore | None, head_plan: HeadBudgetPlan | None
    ) -> None:
        self.settings = settings
        self.block_size = block_size
        self.store = store
        self.head_plan = head_plan

    def params_for(self, request) -> EffectiveParams | None:
        sampling = request.sampling_params
        try:
            request_params = parse_request_params(sampling.extra_args if sampling is not None else None)
        except ConfigError as exc:  # the front end validates; reaching here means an offline caller
            logger.warning("request %s: %s; served uncompacted", request.request_id, exc)
            return None
        return effective_params(self.settings, request_params)

    def prefill_layout(self, request, params: EffectiveParams) -> CompactionLayout | None:
        """The prompt compaction this request asks for, or None if its prompt is too short."""
        layout = plan_layout(
            num_tokens=None,
            prompt_tokens=request.num_prompt_tokens,
            keep_first=params.keep_first,
            keep_last=params.keep_last,
            ratio=params.ratio,
            target_tokens=params.target_tokens,
            min_span_tokens=self.settings.min_prompt_tokens,
            block_size=self.block_size,
        )
        return None if layout is None else self.with_head_budgets(layout)

    def with_head_budgets(self, layout: CompactionLayout) -> CompactionLayout:
        """Non-uniform head budgets need as many slots as the largest head budget."""
        if self.head_plan is None:
            return layout
        targets = self.head_plan.targets(layout.span_tokens, layout.target)
        return widen_layout(layout, max(max(row) for row in targets), self.block_size)

    def head_targets(self, state: RequestCompaction, layout: CompactionLayout):
        if self.head_plan is None or layout.online:
            return None  # online re-compaction stays uniform
        own = state.layout
        uniform = layout_for_span(own.span_end, own.keep_first, state.params.ratio, state.params.target_tokens, self.block_size)
        return self.head_plan.targets(uniform.span_tokens, uniform.target)

    # -- compacted-prefix lookup ---------------------------------------------------------------------

    def stored_prefix(self, request, state: RequestCompaction) -> tuple[CompactionLayout, list] | None:
        """The stored compacted prefix this request starts from (layout, blocks), or None.

        Searched once per life; later calls (the request still waits for admission) only check that the
        blocks found are still cached."""
        if not state.lookup_done:
            state.prefix_key = self.store.prefix_key(request, state.layout, state.params.cache_key())
            state.lookup_hit = self._search(request, state)
            state.lookup_done = True
            self.store.asked(state.lookup_hit[1] if state.lookup_hit else state.prefix_key)
        if state.lookup_hit is None:
            return None
        layout, key = state.lookup_hit
        blocks = self.store.lookup(key, layout.prefix_physical_len // self.block_size)
        if blocks is None:  # evicted while the request waited: it now prefills and compacts itself
            state.lookup_hit = None
            return None
        return layout, blocks

    def _search(self, request, state: RequestCompaction) -> tuple[CompactionLayout, bytes] | None:
        """The longest stored compaction of a block-aligned prefix of this prompt, with this request's
        parameters and a span no longer than its own: questions of different lengths after the same
        document still share the document's compaction."""
        params, own = state.params, state.layout
        min_end = own.keep_first + max(1, self.settings.min_prompt_tokens)
        for span_end in range(own.span_end, min_end - 1, -self.block_size):
            layout = own if span_end == own.span_end else self.with_head_budgets(
                layout_for_span(span_end, own.keep_first, params.ratio, params.target_tokens, self.block_size)
            )
            key = state.prefix_key if layout is own else self.store.prefix_key(request, layout, params.cache_key())
            if key is None:
                continue
            if self.store.lookup(key, layout.prefix_physical_len // self.block_size) is not None:
                return layout, key
        return None
