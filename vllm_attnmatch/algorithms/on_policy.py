"""On-policy compaction of a whole model: layer ℓ is fitted with reference queries produced while layers
< ℓ already hold their compacted KV (and β).

Why: off-policy reference queries come from the full cache, but at inference the queries reaching layer
ℓ have passed through compacted layers 0..ℓ-1; fitting layer ℓ on the queries it will actually see
removes that mismatch (the authors' on-policy option). The query-producing text (e.g. a "repeat the
previous context" prompt followed by the document) is teacher-forced after the document, once per layer.
Cost: one forward of that text per layer.
"""

from __future__ import annotations

import torch

from .base import CompactionResult, compact
from .queries import group_queries
from .reference_llama import LayerKV, ReferenceLlama


def compact_model_on_policy(
    model: ReferenceLlama,
    doc_ids: list[int],
    query_ids: list[int],
    target: int,
    method: str = "highest_attention",
    **options,
) -> tuple[list[LayerKV], list[CompactionResult]]:
    """Compact every layer's cache of ``doc_ids`` to ``target`` entries per KV head, layer by layer.

    Returns the compacted cache (one :class:`LayerKV` per layer, β included) and the per-layer results.
    """
    _, full_cache, _ = model.prefill(doc_ids)
    num_tokens = len(doc_ids)
    key_positions = torch.arange(num_tokens)
    query_positions = torch.arange(num_tokens, num_tokens + len(query_ids))
    compacted: list[LayerKV] = []
    results: list[CompactionResult] = []
    for layer in range(model.num_layers):
        cache = [kv.clone() for kv in compacted] + [kv.clone() for kv in full_cache[layer:]]
        _, queries = model.forward(query_ids, cache, num_tokens, return_queries=True)
        q, qpos = group_queries(queries[layer], model.num_kv_heads, query_positions)
        kv = full_cache[layer]
        result = compact(kv.keys, kv.values, q, target, method, query_positions=qpos, key_positions=key_positions,
                         **options)
        compacted.append(LayerKV(result.keys, result.values, result.beta))
        results.append(result)
    return compacted, results
