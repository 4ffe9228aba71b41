"""Model-level checks on the bundled SmolLM2 with a short real context (marked ``model``)."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vllm_attnmatch.algorithms import budget, compact, group_queries
from vllm_attnmatch.algorithms.reference_llama import LayerKV

pytestmark = pytest.mark.model
TEXT = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def setup(bundled):
    return bundled.folder, bundled.model, bundled.ids


def test_reference_forward_matches_transformers(setup):
    folder, model, ids = setup
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = ids[:96]
    with torch.no_grad():
        ref = hf(torch.tensor([x])).logits[0]
    logits, cache, queries = model.prefill(x)
    assert (logits - ref).abs().max() < 2e-3
    assert len(cache) == 30 and cache[0].keys.shape == (3, 96, 64) and queries[0].shape == (96, 9, 64)


def test_uncompacted_cache_reproduces_full_logits_with_logical_positions(setup):
    _, model, ids = setup
    x = ids[:160]
    full, _, _ = model.prefill(x)
    _, cache, qs = model.prefill(x[:128])
    # t = T through compact(): nothing removed, β = 0 → exactly the full-cache logits
    kept = []
    for kv, q in zip(cache, qs):
        gq, pos = group_queries(q, 3)
        r = compact(kv.keys, kv.values, gq, 128, query_positions=pos, key_positions=torch.arange(128))
        kept.append(LayerKV(r.keys, r.values, r.beta))
    tail = model.forward(x[128:], kept, start_position=128)
    assert (tail - full[128:]).abs().max() < 1e-4
    assert len(kept[0]) == 160  # forward appended the new tokens to the cache


def test_beta_shifts_attention_like_duplicated_keys(setup):
    # A cached entry with β = log 2 must act exactly like that entry stored twice.
    _, model, ids = setup
    x = ids[:40]
    _, cache, _ = model.prefill(x[:32])
    dup = [LayerKV(torch.cat([kv.keys, kv.keys[:, 5:6]], 1), torch.cat([kv.values, kv.values[:, 5:6]], 1),
                   torch.zeros(3, 33)) for kv in cache]
    biased = []
    for kv in cache:
        b = torch.zeros(3, 32)
        b[:, 5] = torch.log(torch.tensor(2.0))
        biased.append(LayerKV(kv.keys.clone(), kv.values.clone(), b))
    a = model.forward(x[32:], dup, start_position=32)
    b = model.forward(x[32:], biased, start_position=32)
    assert (a - b).abs().max() < 1e-4
    plain = model.forward(x[32:], [kv.clone() for kv in cache], start_position=32)
    assert (a - plain).abs().max() > 1e-3


def test_default_attention_matching_beats_eviction_on_continuation_kl(setup, device):
    # The compaction runs on ``device`` (CUDA when present) with CPU positions, the model on the CPU.
    _, model, ids = setup
    T, C = 384, 48
    doc, cont = ids[:T], ids[T:T + C]
    _, cache, qs = model.prefill(doc)
    full = F.log_softmax(model.forward(cont, [kv.clone() for kv in cache], T), -1)
    grouped = [group_queries(q, 3, torch.arange(T)) for q in qs]
    t = budget(T, ratio=0.1)

    def kl(method):
        comp = []
        for kv, (gq, pos) in zip(cache, grouped):
            r = compact(kv.keys.to(device), kv.values.to(device), gq.to(device), t, method, query_positions=pos,
                        key_positions=torch.arange(T))
            assert torch.isfinite(r.values.to(torch.bfloat16)).all() and torch.isfinite(r.beta).all()
            comp.append(LayerKV(r.keys.cpu(), r.values.cpu(), r.beta.cpu()))
        logp = F.log_softmax(model.forward(cont, comp, T), -1)
        return float((full.exp() * (full - logp)).sum(-1).mean())

    am, trunc, rnd, h2o = kl("highest_attention"), kl("truncate"), kl("random"), kl("h2o")
    assert am < 0.7 * min(trunc, rnd), (am, trunc, rnd)
    assert am < 0.9 * h2o, (am, h2o)  # measured 0.198 vs 0.287
