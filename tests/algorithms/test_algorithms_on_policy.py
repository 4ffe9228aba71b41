"""One-pass on-policy compaction: layer ℓ sees queries produced over compacted layers < ℓ (marked ``model``)."""

import pytest
import torch

from vllm_attnmatch.algorithms import compact, compact_model_on_policy, group_queries
from vllm_attnmatch.algorithms.on_policy import on_policy_pass
from vllm_attnmatch.algorithms.reference_llama import LayerKV

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


def test_one_pass_layer_sees_exactly_the_compacted_layers_before_it(bundled):
    """The queries layer ℓ is fitted on are those of a plain forward over [compacted 0..ℓ-1 ; full ℓ..]:
    equal to the off-policy ones at layer 0 and different from layer 1 on, all from ONE forward."""
    model, ids = bundled.model, bundled.ids
    doc, text = ids[:96], ids[96:136]
    T = len(doc)
    _, full_cache, _ = model.prefill(doc)
    key_positions = torch.arange(T)
    forwards = []  # layers reached by the pass, in order: one forward means 0, 1, ..., L-1 once each

    def compact_layer(layer, queries, positions):
        forwards.append(layer)
        q, qpos = group_queries(queries, model.num_kv_heads, positions)
        kv = full_cache[layer]
        r = compact(kv.keys, kv.values, q, 24, query_positions=qpos, key_positions=key_positions)
        return LayerKV(r.keys, r.values, r.beta), r

    rows = [(text, torch.arange(T, T + len(text)))]
    compacted, _, used = on_policy_pass(model, full_cache, rows, compact_layer)
    assert forwards == list(range(model.num_layers))
    _, off = model.forward(text, [kv.clone() for kv in full_cache], T, return_queries=True)
    torch.testing.assert_close(used[0], off[0], atol=1e-4, rtol=1e-4)
    for layer in range(1, model.num_layers):
        assert not torch.allclose(used[layer], off[layer], atol=1e-3), f"layer {layer} saw no compacted layer"
    for layer in (1, 2, 15, model.num_layers - 1):
        mixed = [kv.clone() for kv in compacted[:layer]] + [kv.clone() for kv in full_cache[layer:]]
        _, ref = model.forward(text, mixed, T, return_queries=True)
        torch.testing.assert_close(used[layer], ref[layer], atol=1e-4, rtol=1e-4)


def test_rows_of_different_lengths_are_teacher_forced_together(bundled):
    """Several rows (self-study answers) in the one pass: each row's queries are its own forward's."""
    model, ids = bundled.model, bundled.ids
    doc = ids[:64]
    T = len(doc)
    _, full_cache, _ = model.prefill(doc)
    rows = [(ids[70:90], torch.arange(T, T + 20)), (ids[100:108], torch.arange(T, T + 8))]
    keep_full = lambda layer, q, pos: (full_cache[layer], None)  # noqa: E731 - no compaction: off-policy
    _, _, used = on_policy_pass(model, full_cache, rows, keep_full)
    for layer in (0, 29):
        expected = []
        for row, _ in rows:
            _, q = model.forward(row, [kv.clone() for kv in full_cache], T, return_queries=True)
            expected.append(q[layer])
        torch.testing.assert_close(used[layer], torch.cat(expected), atol=1e-4, rtol=1e-4)
