"""N questions on one document: prefill work, latency and KV blocks with and without compacted-prefix reuse.

Three ways to serve the same N requests (document + question i), one after the other:
- ``plain prefix cache``: no ``am_*`` keys; vLLM's own prefix cache reuses the uncompacted document;
- ``compact, no reuse``: ``am_ratio`` with a distinct ``cache_salt`` per request, so every request
  prefills and compacts the document itself;
- ``compact + reuse``: ``am_ratio``; the first request compacts, the others reuse the stored prefix.

Reported per mode: prompt tokens actually prefilled (prompt tokens minus vLLM's prefix-cache hits minus
the plugin's compacted-prefix savings), total and mean time to first token, and the peak number of KV
blocks held (the plugin's free-block gauge, polled while the requests run).

    python -m benchmarks prefix-reuse [--url URL] [--questions 8] [--ratio 0.1]
"""

from __future__ import annotations

import argparse
import time

from tqdm import tqdm

from ..common import output, texts
from ..common.serving import Servers, ServerSpec, Watcher, delta
from ..common.stamp import describe, stamp

QUESTIONS = [
    "Who may copy and distribute this license?",
    "What does the word 'free' refer to in this text?",
    "What must be done when conveying the source code?",
    "What is the purpose of this license?",
    "What happens if you violate the terms of the license?",
    "Which rights does the license give to recipients?",
    "What does 'the Program' mean here?",
    "What is said about warranties?",
    "How can patents threaten free software?",
    "What should a developer do to protect the users' rights?",
]
MODES = ("plain prefix cache", "compact, no reuse", "compact + reuse")
FREE = "vllm_attnmatch_kv_free_blocks"


def run_mode(endpoint, args, tok, doc, mode, run_id) -> dict:
    before = endpoint.metrics()
    watcher = Watcher(endpoint, (FREE,), period_s=0.05)
    ttfts = []
    for i in tqdm(range(args.questions), desc=mode, leave=False):
        question = tok(f"\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:")["input_ids"]
        xargs = None if mode == "plain prefix cache" else {"am_ratio": args.ratio}
        salt = f"{run_id}-{mode}-{i}" if mode == "compact, no reuse" else f"{run_id}-{mode}"
        ttfts.append(endpoint.stream(doc + question, 8, xargs, salt, ignore_eos=False).ttft_s)
    time.sleep(0.5)
    watcher.stop()
    after = endpoint.metrics()
    prompt = delta(before, after, "vllm:prompt_tokens_total")
    prefilled = (prompt - delta(before, after, "vllm:prefix_cache_hits_total")
                 - delta(before, after, "vllm_attnmatch_prefill_tokens_saved_total"))
    return {
        "mode": mode,
        "prompt_tokens": prompt,
        "prefilled_tokens": prefilled,
        "compactions": delta(before, after, "vllm_attnmatch_compactions_total"),
        "ttft_total_s": sum(ttfts),
        "ttft_first_s": ttfts[0],
        "ttft_rest_mean_s": sum(ttfts[1:]) / max(1, len(ttfts) - 1),
        "peak_blocks_held": watcher.start[FREE] - watcher.low[FREE],
    }


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [
        f"# {c['questions']} questions on one {c['doc_tokens']}-token document (ratio {c['ratio']})", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        *output.table(["mode", "prompt tokens", "prefilled tokens", "compactions", "TTFT first (s)", "TTFT others, mean (s)",
                       "total TTFT (s)", "peak KV blocks held"],
                      [[r["mode"], f"{r['prompt_tokens']:.0f}", f"{r['prefilled_tokens']:.0f}", f"{r['compactions']:.0f}",
                        f"{r['ttft_first_s']:.2f}", f"{r['ttft_rest_mean_s']:.2f}", f"{r['ttft_total_s']:.2f}",
                        f"{r['peak_blocks_held']:.0f}"] for r in result["rows"]]),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks prefix-reuse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--doc-tokens", type=int, default=2048, help="a multiple of the KV block size")
    args = parser.parse_args(argv)

    tok = texts.tokenizer()
    doc = texts.token_ids(tok, "GPL-3")[: args.doc_tokens]
    meta = stamp()
    run_id = time.strftime("%H%M%S")
    with Servers(args.url, args.model) as servers:
        endpoint = servers.get(ServerSpec("prefix-reuse"))
        rows = [run_mode(endpoint, args, tok, doc, m, run_id) for m in MODES]
        server = endpoint.describe()
    result = {"suite": "prefix_reuse", "meta": meta, "server": server,
              "config": {"questions": args.questions, "doc_tokens": len(doc), "ratio": args.ratio}, "rows": rows}
    md = markdown(result)
    output.write(result, "prefix_reuse_latest", md)
    print(md)
    return 0
