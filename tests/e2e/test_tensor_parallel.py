"""Tensor parallelism on CPU: the bundled model (9 query / 3 KV heads) at TP = 3, one KV head per rank.

Every rank compacts its own heads of the same job into the same destination blocks, and only rank 0's
result reaches the scheduler: a job must be applied only if every rank succeeded. One server, three short
requests (wall time measured here: about 3 min to start and 2–5 min a request under heavy load, since each
decode step waits on 60 all-reduces of three ranks sharing two cores); the independent pure-torch forward is
the reference (vLLM at TP = 1 matches it, see
``test_compaction_engine.py``).
"""

from __future__ import annotations

import time

import pytest
import torch

from harness.server import Server
from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama

pytestmark = pytest.mark.server

TP = 3
# Every decode step of three ranks on two cores waits on 60 shared-memory all-reduces: keep outputs short.
MAX_TOKENS = 6
CONFIG = {"attnmatch": {"preset": "default"}}


@pytest.fixture(scope="module")
def tp_server(model_dir):
    started = time.perf_counter()
    server = Server(
        "tp3", model_dir, CONFIG,
        ["--enforce-eager", "--tensor-parallel-size", str(TP), "--gpu-memory-utilization", "0.25"],
        {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_ATTNMATCH_FAULT_INJECTION": "1"},
    )
    try:
        server.wait_ready()
        print(f"\nTP={TP} server ready in {time.perf_counter() - started:.0f} s")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference(model_dir) -> ReferenceLlama:
    return ReferenceLlama.from_pretrained(model_dir)


def _complete(server, prompt, max_tokens, xargs=None, **extra):
    body = {"return_tokens_as_token_ids": True, **extra}
    if xargs:
        body["vllm_xargs"] = xargs
    choice = server.client().completions.create(
        model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, logprobs=1, extra_body=body
    ).choices[0]
    return [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens], choice.logprobs.token_logprobs


def _assert_matches(ref_logits, generated, vllm_logprobs, atol=1e-3):
    ref_logprobs = torch.log_softmax(ref_logits.float(), dim=-1)
    for k, token in enumerate(generated):
        assert int(ref_logits[k].argmax()) == token, f"greedy token {k} differs"
        assert abs(float(ref_logprobs[k, token]) - vllm_logprobs[k]) <= atol, k


def test_every_rank_runs_the_plugin(tp_server):
    log = tp_server.log()
    for rank in range(TP):
        assert f"active (worker rank {rank}," in log


def _merged_dump(dump_dir, req_file) -> dict:
    """The ranks' dumps of one job (rank r > 0 under ``rank<r>/``), heads concatenated in rank order."""
    dumps = [torch.load(dump_dir / req_file, weights_only=False)]
    dumps += [torch.load(dump_dir / f"rank{r}" / req_file, weights_only=False) for r in range(1, TP)]
    layers = {}
    for name in dumps[0]["layers"]:
        parts = [d["layers"][name] for d in dumps]
        assert all(p["keys"].shape[0] == 1 for p in parts)  # one KV head per rank
        layers[name] = {key: torch.cat([p[key] for p in parts]) for key in ("keys", "values", "beta")}
    return {"layout": dumps[0]["layout"], "layers": layers}


def test_compaction_at_tp3_matches_the_reference_fed_the_ranks_compacted_heads(
    tp_server, reference, tokenizer, document
):
    prompt = tokenizer(document)["input_ids"]
    before = set(tp_server.dump_dir.glob("*.pt"))
    generated, logprobs = _complete(tp_server, prompt, MAX_TOKENS, {"am_ratio": 0.2}, cache_salt="tp-parity")
    new = set(tp_server.dump_dir.glob("*.pt")) - before
    assert len(new) == 1
    dump = _merged_dump(tp_server.dump_dir, next(iter(new)).name)
    layout = dump["layout"]
    span_end, first = layout.span_end, layout.keep_first
    assert layout.physical_len < span_end < len(prompt)

    _, full_cache, _ = reference.prefill(prompt[:span_end])
    cache = []
    for i, full in enumerate(full_cache):
        entry = dump["layers"][f"model.layers.{i}.self_attn.attn"]
        # Each rank kept its own head's raw KV: together they are the model's (head order = rank order).
        torch.testing.assert_close(entry["keys"][:, :first].float(), full.keys[:, :first], atol=2e-3, rtol=1e-3)
        cache.append(LayerKV(entry["keys"].float(), entry["values"].float(), entry["beta"].float()))
    rest = prompt[span_end:]
    logits = reference.forward(rest + generated[:-1], cache, start_position=span_end)
    _assert_matches(logits[len(rest) - 1 :], generated, logprobs)


def test_plain_request_matches_the_reference_and_a_job_failing_on_one_rank_is_applied_on_none(
    tp_server, reference, tokenizer, document
):
    """A plain request at TP = 3 is the model's own output. Then the same prompt compacts, and the last
    rank's solver fails while ranks 0 and 1 succeed: without agreement rank 0 reports success and the
    request decodes from blocks whose third head was never written."""
    prompt = tokenizer(document[:1600])["input_ids"]
    plain, plain_logprobs = _complete(tp_server, prompt, MAX_TOKENS)
    logits, _, _ = reference.prefill(prompt + plain[:-1])
    _assert_matches(logits[len(prompt) - 1 :], plain, plain_logprobs)

    before = tp_server.metrics()
    served, _ = _complete(tp_server, prompt, MAX_TOKENS, {"am_ratio": 0.2, "attnmatch_fault": "solver_on_last_rank"},
                          cache_salt="tp-fault")
    after = tp_server.metrics()
    assert after["failures"] == before["failures"] + 1
    assert after["compactions"] == before["compactions"]
    assert served == plain  # served uncompacted on every rank
    assert "failed on another tensor-parallel rank" in tp_server.log()
