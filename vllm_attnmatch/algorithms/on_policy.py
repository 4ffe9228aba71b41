"""On-policy compaction of a whole model in ONE forward: layer ℓ is fitted with reference queries produced
while layers < ℓ already hold their compacted KV (and β).

Why: off-policy reference queries come from the full cache, but at inference the queries reaching layer
ℓ have passed through compacted layers 0..ℓ-1; fitting layer ℓ on the queries it will actually see
removes that mismatch (the authors' on-policy option). The authors re-run layers 0..ℓ for every ℓ
(O(L²) layer passes; their TODO asks for a "truly layer-wise" version). Here the query-producing rows
(a "repeat the previous context" prompt + the document, or self-study prompts and their answers) are
teacher-forced once: when the forward reaches layer ℓ, its queries already went through compacted layers
< ℓ; layer ℓ is compacted right there (:class:`PrefixBatch`'s hook) and the rows attend to the compacted
layer ℓ before moving on. Cost: one forward of the rows plus the fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import CompactionResult, compact
from .queries import group_queries
from .reference_llama import LayerKV, PrefixBatch, ReferenceLlama

#: ``(layer, queries (n, H_q, d), positions (n,)) -> (compacted LayerKV, result)``
LayerCompactor = Callable[[int, torch.Tensor, torch.Tensor], tuple[LayerKV, object]]


def on_policy_pass(
    model: ReferenceLlama,
    cache: list[LayerKV],
    rows: Sequence[tuple[Sequence[int], torch.Tensor]],
    compact_layer: LayerCompactor,
) -> tuple[list[LayerKV], list, list[torch.Tensor]]:
    """Teacher-force ``rows`` (token ids, logical positions) after ``cache`` in one batched forward,
    compacting each layer with ``compact_layer`` on the queries that reach it.

    Returns the compacted cache (one :class:`LayerKV` per layer), ``compact_layer``'s results, and the
    on-policy queries each layer was fitted on (``(n, H_q, d)``, rows' valid tokens, row by row).
    """
    if not rows:
        raise ValueError("on-policy fitting needs at least one row of query-producing tokens")
    B = len(rows)
    P = max(len(ids) for ids, _ in rows)
    tokens = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    positions = torch.zeros(B, P, dtype=torch.long)
    for b, (ids, pos) in enumerate(rows):
        pad = P - len(ids)
        tokens[b, pad:] = torch.as_tensor(list(ids), dtype=torch.long)
        valid[b, pad:] = True
        positions[b, pad:] = pos
        positions[b, :pad] = int(pos[0]) if len(ids) else 0
    compacted: list[LayerKV | None] = [None] * model.num_layers
    results: list = [None] * model.num_layers
    used: list[torch.Tensor | None] = [None] * model.num_layers

    def hook(layer: int, queries: torch.Tensor, query_positions: torch.Tensor) -> LayerKV:
        used[layer] = queries
        compacted[layer], results[layer] = compact_layer(layer, queries, query_positions)
        return compacted[layer]

    PrefixBatch(model, cache, B, P).step(tokens, positions, valid, hook=hook, logits=False, want_queries=False)
    return compacted, results, used  # type: ignore[return-value]


def compact_model_on_policy(
    model: ReferenceLlama,
    doc_ids: list[int],
    query_ids: list[int] | Sequence[Sequence[int]],
    target: int,
    method: str = "highest_attention",
    fixed_queries: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    **options,
) -> tuple[list[LayerKV], list[CompactionResult]]:
    """Compact every layer's cache of ``doc_ids`` to ``target`` entries per KV head, on-policy, in one pass.

    ``query_ids``: the token ids teacher-forced after the document (one row), or several rows (each
    starting right after the document). ``fixed_queries``: optional per-layer ``(queries (n, H_q, d),
    positions (n,))`` added off-policy to every layer's set (e.g. the document's own prefill queries).
    Returns the compacted cache (β included) and the per-layer results.
    """
    _, full_cache, _ = model.prefill(doc_ids)
    T = len(doc_ids)
    key_positions = torch.arange(T)
    many = bool(query_ids) and not isinstance(query_ids[0], int)
    rows = [(list(ids), torch.arange(T, T + len(ids))) for ids in (query_ids if many else [query_ids])]

    def compact_layer(layer: int, queries: torch.Tensor, positions: torch.Tensor):
        if fixed_queries is not None:
            fq, fpos = fixed_queries[layer]
            queries, positions = torch.cat([fq.to(queries), queries]), torch.cat([fpos, positions])
        q, qpos = group_queries(queries, model.num_kv_heads, positions)
        kv = full_cache[layer]
        result = compact(kv.keys, kv.values, q, target, method, query_positions=qpos, key_positions=key_positions,
                         **options)
        return LayerKV(result.keys, result.values, result.beta), result

    compacted, results, _ = on_policy_pass(model, full_cache, rows, compact_layer)
    return compacted, results
