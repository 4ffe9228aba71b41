"""The engine's on-policy compaction (server setting ``on_policy``): the worker glue around the one-pass
fit, on the bundled model and a paged cache shaped like the engine's (marked ``model``)."""

import math

import pytest
import torch

from vllm_attnmatch.algorithms.on_policy import on_policy_pass
from vllm_attnmatch.algorithms.reference_llama import LayerKV
from vllm_attnmatch.config import ServerConfig
from vllm_attnmatch.contract.jobs import CompactionJob
from vllm_attnmatch.engine.layouts import layout_for_span
from vllm_attnmatch.worker.executor import JobRun, compact_layer
from vllm_attnmatch.worker.synthetic import SyntheticQueryProducer

pytestmark = pytest.mark.model

BLOCK = 16


class PagedCache:
    """The request's KV in 16-token blocks, per layer (the executor's ``PagedKV`` protocol)."""

    def __init__(self, cache, blocks: int):
        H, T, d = cache[0].keys.shape
        self.names = [f"model.layers.{i}.self_attn.attn" for i in range(len(cache))]
        self.k, self.v, self.b = {}, {}, {}
        for name, kv in zip(self.names, cache):
            k, v = torch.zeros(blocks, H, BLOCK, d), torch.zeros(blocks, H, BLOCK, d)
            n = -(-T // BLOCK)
            k[:n].view(n, H, BLOCK, d).copy_(torch.nn.functional.pad(kv.keys, (0, 0, 0, n * BLOCK - T)).view(H, n, BLOCK, d).transpose(0, 1))
            v[:n].view(n, H, BLOCK, d).copy_(torch.nn.functional.pad(kv.values, (0, 0, 0, n * BLOCK - T)).view(H, n, BLOCK, d).transpose(0, 1))
            self.k[name], self.v[name], self.b[name] = k, v, torch.zeros(blocks, H, BLOCK)

    def layer_names(self):
        return list(self.names)

    def scale(self, layer):
        return 1 / math.sqrt(64)

    def _rows(self, cache, block_ids, length):
        t = cache[torch.as_tensor(block_ids)]
        return t.transpose(0, 1).reshape(t.shape[1], -1, *t.shape[3:])[:, :length]

    def gather(self, layer, block_ids, length):
        return self._rows(self.k[layer], block_ids, length), self._rows(self.v[layer], block_ids, length)

    def write(self, layer, block_ids, keys, values, beta):
        for i, block in enumerate(block_ids):
            lo, hi = i * BLOCK, min((i + 1) * BLOCK, keys.shape[1])
            self.k[layer][block].zero_(), self.v[layer][block].zero_(), self.b[layer][block].zero_()
            if hi > lo:
                self.k[layer][block, :, : hi - lo] = keys[:, lo:hi]
                self.v[layer][block, :, : hi - lo] = values[:, lo:hi]
                self.b[layer][block, :, : hi - lo] = beta[:, lo:hi]


def test_the_engine_compacts_layer_l_on_the_queries_that_reach_it_through_compacted_layers(bundled):
    model, ids = bundled.model, bundled.ids[:160]
    _, cache, context_queries = model.prefill(ids)
    kv = PagedCache(cache, blocks=16)
    layout = layout_for_span(160, 4, 0.25, None, BLOCK)
    src, dst = tuple(range(10)), tuple(range(10, 10 + -(-layout.physical_len // BLOCK)))
    job = CompactionJob("r", layout, src, dst, "highest_attention", "self_study", None)
    settings = ServerConfig(on_policy=True, self_study_tokens=4, self_study_prompts="tasks")
    producer = SyntheticQueryProducer(model, bundled.tokenizer, settings)
    queries = {name: q for name, q in zip(kv.layer_names(), context_queries)}
    positions = torch.arange(160)

    made = producer.produce_on_policy(job, kv, ids, queries, positions)
    assert set(made.layers) == set(kv.layer_names()) and made.rows
    assert made.generation_seconds > 0 and made.pass_seconds > 0 and {"scoring", "beta", "values"} <= set(made.fit_timings)

    # Off-policy reference: the same rows' queries over the FULL cache, layer by layer.
    seen = {}

    def keep_full(layer, q, pos):
        seen[layer] = (q, pos)
        return cache[layer], None

    on_policy_pass(model, cache, made.rows, keep_full)
    first, last = kv.layer_names()[0], kv.layer_names()[-1]
    off_first = compact_layer(job, *kv.gather(first, src, 160), queries[first], positions, kv.scale(first), *seen[0])
    off_last = compact_layer(job, *kv.gather(last, src, 160), queries[last], positions, kv.scale(last), *seen[29])
    torch.testing.assert_close(made.layers[first][1], off_first[1])  # nothing compacted before layer 0
    assert not torch.allclose(made.layers[last][1], off_last[1])  # layer 29 saw compacted layers 0..28

    # On-policy reference, built here: the same rows through a cache whose layers < l are compacted.
    def compact_then_continue(layer, q, pos):
        name = kv.layer_names()[layer]
        keys, values, beta, _ = compact_layer(job, *kv.gather(name, src, 160), queries[name], positions,
                                              kv.scale(name), q, pos)
        seen[layer] = (keys, values, beta)
        prefix = layout.prefix_physical_len
        return LayerKV(keys[:, :prefix].float(), values[:, :prefix].float(), beta[:, :prefix].float()), None

    on_policy_pass(model, cache, made.rows, compact_then_continue)
    for layer in (0, 15, 29):
        name = kv.layer_names()[layer]
        for got, expected in zip(made.layers[name][:3], seen[layer]):
            torch.testing.assert_close(got, expected)

    # The job's slices write exactly what the pass produced, and report where the time went.
    run = JobRun(job, kv, {}, None, compacted=made)
    expected = {name: made.layers[name][0].clone() for name in kv.layer_names()}
    while not run.done:
        run.run_layers(7)
    assert run.result().ok and not made.layers
    for name in kv.layer_names():
        torch.testing.assert_close(kv.gather(name, dst, layout.physical_len)[0], expected[name])


def test_repeat_queries_are_made_one_layer_per_slice_and_compact_as_the_whole_pass_would(bundled):
    """The ``repeat`` source re-reads the document inside the job's layer slices: a slice of k layers
    runs k layers of the re-read (the batch is never frozen for a whole re-read), and the compacted
    layers equal those of the same job fed the eager pass's queries and KVzip scores."""
    from vllm_attnmatch.worker.query_sources import REPEAT_PROMPT, repeat_queries
    from vllm_attnmatch.worker.synthetic import ExtraQueries

    model, ids = bundled.model, bundled.ids[:160]
    _, cache, context_queries = model.prefill(ids)
    layout = layout_for_span(160, 4, 0.25, None, BLOCK)
    src = tuple(range(10))
    dst = tuple(range(10, 10 + -(-layout.physical_len // BLOCK)))
    job = CompactionJob("r", layout, src, dst, "highest_attention", "repeat", None, {"reduction": "reconstruction"})
    producer = SyntheticQueryProducer(model, bundled.tokenizer, ServerConfig())
    positions = torch.arange(160)

    def run_with(kv, extra):
        run = JobRun(job, kv, {n: q for n, q in zip(kv.layer_names(), context_queries)}, positions, extra)
        made = []
        while not run.done:
            run.run_layers(3)
            made.append(getattr(extra, "layers_made", None))
        assert run.result().ok, run.error
        return {name: kv.gather(name, dst, layout.physical_len) for name in kv.layer_names()}, made

    layered_kv = PagedCache(cache, blocks=16)
    layered = producer.produce(job, layered_kv, ids)
    assert layered.layers_made == 0  # nothing re-read in the step that ships the job
    layered_out, made = run_with(layered_kv, layered)
    assert made == list(range(3, 31, 3))  # three layers of the re-read per slice of three layers

    eager_kv = PagedCache(cache, blocks=16)
    end = layout.span_end
    prefix = [type(kv)(kv.keys[:, :end], kv.values[:, :end], kv.bias[:, :end]) for kv in cache]
    prompt = bundled.tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
    eager = repeat_queries(model, prefix, ids[:end], prompt, 2048, key_scores=True)
    names = eager_kv.layer_names()
    eager_out, _ = run_with(eager_kv, ExtraQueries(dict(zip(names, eager.queries)), eager.positions, eager.seconds,
                                                   dict(zip(names, eager.info["key_scores"]))))
    for name in names:
        torch.testing.assert_close(layered_out[name][0], eager_out[name][0])
        torch.testing.assert_close(layered_out[name][1], eager_out[name][1])
