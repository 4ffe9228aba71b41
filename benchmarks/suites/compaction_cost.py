"""What one request's compaction costs, per component, offline (no server): issue 12.5's profile.

For each context length T it runs the worker's own per-layer path (``worker.executor.compact_layer``,
the served algorithm and options) on one layer's worth of inputs shaped like the bundled SmolLM2-135M
(3 KV heads, 3 query heads per KV head, head_dim 64; context queries, all T prompt tokens captured),
times each component, and scales one layer to the model's 30 layers:

- ``prepare``: the executor's query filtering and GQA pooling;
- ``queries``: query subsampling and positions; ``scoring``: the streamed block softmax and key
  selection; ``beta``: the β fit; ``values``: the value fit; ``gate``: the held-out gate;
- ``write``: the new layout written into a paged cache (the torch scatter every CPU runner uses).

Inputs are synthetic (seeded Gaussians scaled to realistic logit spreads) unless ``--model`` is given,
which takes real K/V/queries from the reference forward of real text (slower: one prefill per T). The
per-component cost depends on the shapes, not on the values, except through the data-dependent
selection of held-out rows; ``--model`` checks that. The machine is shared, so each row records the
1-minute load average next to its numbers and the intra-op threads used.

Also reports the work memory of the streamed scoring pass (``peak_work_mib``: the largest
``(H, tile, T)`` fp32 tensors held at once, bounded by ``--query-tile``, not by the number of queries)
and, on CUDA, the peak device memory above the inputs.

    python -m benchmarks.suites.compaction_cost                          # T = 1024, 2048, 4096, 2 threads
    python -m benchmarks.suites.compaction_cost --lengths 4096 --model   # real K/V/queries (slow)
    python -m benchmarks.suites.compaction_cost --device cuda

Writes ``benchmarks/results/compaction_cost_<tag>.{json,md}`` (tag ``latest`` by default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the benchmarks package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch

from benchmarks.common.output import RESULTS
from benchmarks.common.stamp import describe, stamp

LAYERS, KV_HEADS, GROUP, HEAD_DIM, BLOCK = 30, 3, 3, 64, 128
COMPONENTS = ("prepare", "queries", "scoring", "beta", "values", "gate", "write")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="context tokens T")
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per length (the minimum is reported)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="K/V dtype (the model dtype)")
    p.add_argument("--method", default="highest_attention")
    p.add_argument("--options", default="{}", help="JSON algorithm options (the server's `algorithm` section)")
    p.add_argument("--query-tile", type=int, default=None, help="rows per tile of the streamed pass")
    p.add_argument("--model", action="store_true", help="real K/V/queries from the reference forward of real text")
    p.add_argument("--tag", default="latest")
    p.add_argument("--results", default=str(RESULTS), help="folder for the result files")
    return p.parse_args(argv)


def _synthetic(T: int, device, dtype, seed: int = 0):
    """One layer: K/V ``(H, T, d)``, captured queries ``(T, H·G, d)`` scaled so q·k/√d has std ≈ 2."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(KV_HEADS, T, HEAD_DIM, generator=g) * 1.4
    values = torch.randn(KV_HEADS, T, HEAD_DIM, generator=g)
    queries = torch.randn(T, KV_HEADS * GROUP, HEAD_DIM, generator=g) * 1.4
    return keys.to(device, dtype), values.to(device, dtype), queries.to(device)


def _real(T: int, device, dtype):
    """One middle layer of the reference forward over T tokens of real text (licences laid end to end)."""
    from benchmarks.common import texts
    from vllm_attnmatch.algorithms.reference_llama import ReferenceLlama
    from vllm_attnmatch.model import ensure_model

    folder = ensure_model()
    ids = texts.long_ids(texts.tokenizer(str(folder)), T)
    model = ReferenceLlama.from_pretrained(folder)
    _, cache, queries = model.prefill(ids)
    layer = len(cache) // 2
    return (cache[layer].keys.to(device, dtype), cache[layer].values.to(device, dtype), queries[layer].to(device))


def _paged_cache(T: int, device, dtype):
    from vllm_attnmatch.kernels import scatter_paged_kv

    blocks = -(-T // BLOCK) + 1
    caches = (torch.zeros(blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
              torch.zeros(blocks, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=dtype),
              torch.zeros(blocks, BLOCK, KV_HEADS, device=device))
    return scatter_paged_kv, caches, torch.arange(blocks, device=device)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure_length(T: int, args) -> dict:
    from vllm_attnmatch.contract.jobs import CompactionJob
    from vllm_attnmatch.engine.layouts import plan_layout
    from vllm_attnmatch.worker.executor import compact_layer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    keys, values, queries = _real(T, args.device, dtype) if args.model else _synthetic(T, args.device, dtype)
    positions = torch.arange(T)  # CPU, as the runner builds them
    layout = plan_layout(None, prompt_tokens=T, keep_first=4, keep_last=16, ratio=args.ratio, target_tokens=None,
                         min_span_tokens=32, block_size=BLOCK)
    options = json.loads(args.options)
    if args.query_tile:
        options["query_tile"] = args.query_tile
    job = CompactionJob("bench", layout, (), (), args.method, "context", None, options)
    scatter, caches, block_ids = _paged_cache(layout.physical_len, args.device, dtype)
    scale = 1 / math.sqrt(HEAD_DIM)
    runs = []
    for rep in range(args.repeats + 1):  # the first run warms up allocators and kernels
        if torch.device(args.device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        load = os.getloadavg()[0]
        timings: dict = {}
        _sync(args.device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        new_k, new_v, beta, _ = compact_layer(job, keys, values, queries, positions, scale, timings=timings)
        _sync(args.device)
        t1 = time.perf_counter()
        scatter(new_k, new_v, beta, *caches, block_ids)
        _sync(args.device)
        t2 = time.perf_counter()
        cpu = time.process_time() - c0
        timings["prepare"] = max(0.0, (t1 - t0) - sum(timings.values()))  # executor work around compact()
        timings["write"] = t2 - t1
        run = {"layer_s": t2 - t0, "layer_cpu_s": cpu, "components_s": timings, "load_1m": round(load, 2)}
        if torch.device(args.device).type == "cuda":
            run["cuda_peak_work_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        if rep:
            runs.append(run)
    best = min(runs, key=lambda r: r["layer_s"])
    # The streamed pass's work memory, from the algorithm itself (one more call, untimed).
    from vllm_attnmatch.algorithms import compact, group_queries

    span = slice(layout.keep_first, layout.span_end)
    pooled, qpos = group_queries(queries[span], KV_HEADS, positions[span])
    probe = compact(keys[:, span], values[:, span], pooled, layout.target, args.method, query_positions=qpos,
                    key_positions=torch.arange(layout.keep_first, layout.span_end), **options)
    return {
        "tokens": T, "span_tokens": layout.span_tokens, "target": layout.target,
        "query_rows_per_kv_head": GROUP * layout.span_tokens,
        "layer_s": best["layer_s"], "request_s": best["layer_s"] * LAYERS,
        # CPU time of the process over the same run: with 1 thread on a shared machine, this is what the
        # compaction costs on a core of its own (wall time also counts the waits for a core).
        "request_cpu_s": min(r["layer_cpu_s"] for r in runs) * LAYERS,
        "components_layer_s": best["components_s"],
        "components_request_s": {k: v * LAYERS for k, v in best["components_s"].items()},
        "load_1m": [r["load_1m"] for r in runs],
        "peak_work_mib": probe.info.get("peak_work_bytes", 0) / 2**20,
        # what the (H, n, T) fp32 logits + softmax of the unstreamed targets would hold at this n
        "unstreamed_work_mib": 2 * KV_HEADS * min(GROUP * layout.span_tokens, options.get("max_queries", 2048) or 10**9)
        * layout.span_tokens * 4 / 2**20,
        "process_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **({"cuda_peak_work_mib": best["cuda_peak_work_mib"]} if "cuda_peak_work_mib" in best else {}),
    }


def markdown(result: dict) -> str:
    cfg = result["config"]
    head = ["T", "captured query rows / KV head (≤ max_queries used)", "t", *[f"{c} s" for c in COMPONENTS],
            "request s (30 layers)", "CPU s",
            "work MiB (unstreamed)", "load 1m"]
    rows = []
    for r in result["rows"]:
        comp = r["components_request_s"]
        rows.append([r["tokens"], r["query_rows_per_kv_head"], r["target"],
                     *[f"{comp.get(c, 0.0):.2f}" for c in COMPONENTS], f"{r['request_s']:.2f}",
                     f"{r['request_cpu_s']:.2f}",
                     f"{r['peak_work_mib']:.0f} ({r['unstreamed_work_mib']:.0f})", "/".join(f"{x:g}" for x in r["load_1m"])])
    lines = [
        "# Compaction cost per component (offline, one request = 30 layers)", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        (f"Method `{cfg['method']}`, options `{cfg['options']}`, ratio {cfg['ratio']}, {cfg['device']} "
         f"{cfg['dtype']}, {cfg['threads']} threads, "
         f"{'real K/V/queries (reference forward)' if cfg['model'] else 'synthetic K/V/queries'}; "
         f"best of {cfg['repeats']} runs of one layer ×30. Components as in `benchmarks/suites/compaction_cost.py`; "
         "`CPU s`: process CPU time for the same work (with 1 thread, the cost on a core of its own when the "
         "machine is shared). `work MiB` is the streamed scoring pass's largest work set (bounded by the query tile); in brackets "
         "what the full (H, n, T) logits and softmax held before the fit worked in query tiles."), "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
        *["| " + " | ".join(str(x) for x in row) + " |" for row in rows],
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    meta = stamp()
    rows = []
    for T in args.lengths:
        row = measure_length(T, args)
        rows.append(row)
        comp = ", ".join(f"{k} {v:.2f}" for k, v in row["components_request_s"].items())
        print(f"T={T}: {row['request_s']:.2f} s per request ({comp}); work {row['peak_work_mib']:.0f} MiB; "
              f"load {row['load_1m']}", flush=True)
    result = {"suite": "compaction_cost", "meta": meta, "config": {k: v for k, v in vars(args).items()}, "rows": rows}
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"compaction_cost_{args.tag}"
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    print(f"wrote {out}.json, {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
