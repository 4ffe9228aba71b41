"""On-policy compaction: layer ℓ sees queries produced over compacted layers < ℓ (marked ``model``)."""

import pytest
import torch

from vllm_attnmatch.algorithms import compact, compact_model_on_policy, group_queries

pytestmark = pytest.mark.model


def test_on_policy_matches_off_policy_at_layer_zero_and_differs_later(bundled):
    model, ids = bundled.model, bundled.ids
    doc, query_text = ids[:96], ids[96:144]
    cache, results = compact_model_on_policy(model, doc, query_text, target=24)
    assert len(cache) == len(results) == model.num_layers
    assert all(len(kv) == 24 and torch.isfinite(kv.bias).all() for kv in cache)

    # Off-policy reference: every layer's queries come from the full cache.
    _, full_cache, _ = model.prefill(doc)
    _, queries = model.forward(query_text, [kv.clone() for kv in full_cache], len(doc), return_queries=True)
    positions = torch.arange(len(doc), len(doc) + len(query_text))
    off = []
    for layer in (0, model.num_layers - 1):
        q, qpos = group_queries(queries[layer], model.num_kv_heads, positions)
        kv = full_cache[layer]
        off.append(compact(kv.keys, kv.values, q, 24, query_positions=qpos, key_positions=torch.arange(len(doc))))
    torch.testing.assert_close(results[0].values, off[0].values)  # nothing compacted before layer 0
    assert not torch.allclose(results[-1].values, off[1].values)  # layer 29 saw compacted layers 0..28
