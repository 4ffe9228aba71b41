"""On-policy vs off-policy repeat-prefill queries: continuation KL after compacting all layers.

Off-policy: every layer's reference queries come from teacher-forcing "repeat the previous context" +
the document over the *full* cache. On-policy: layer ℓ's come from the same text over a cache whose
layers < ℓ are already compacted (``algorithms.compact_model_on_policy``).

    python -m benchmarks on-policy [--text GPL-3] [--ratio 0.1] [--doc-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vllm_attnmatch.algorithms import budget, compact_model_on_policy

from ..common import output
from .offline import REPEAT_PROMPT, Workload, run_one, stamp


def continuation_kl(w: Workload, cache) -> float:
    logits = w.model.forward(w.cont, cache, len(w.doc))
    logp = F.log_softmax(logits.float(), -1)
    return float((w.full_logp.exp() * (w.full_logp - logp)).sum(-1).mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks on-policy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default="GPL-3")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--method", default="highest_attention")
    parser.add_argument("--doc-tokens", type=int, default=1024)
    parser.add_argument("--cont-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from transformers import AutoTokenizer

    from vllm_attnmatch.algorithms.reference_llama import ReferenceLlama
    from vllm_attnmatch.model import ensure_model

    folder = ensure_model()
    tok = AutoTokenizer.from_pretrained(folder)
    model = ReferenceLlama.from_pretrained(folder)
    w = Workload(model, tok, args.text, args.doc_tokens, args.cont_tokens, ("repeat",))
    query_ids = tok(REPEAT_PROMPT, add_special_tokens=False)["input_ids"] + w.doc
    target = budget(len(w.doc), ratio=args.ratio)
    rows = {}
    started = time.perf_counter()
    off = run_one(w, args.method, args.ratio, "repeat")
    rows["off-policy repeat"] = {"kl": off["kl"], "dnll_pct": off["dnll_pct"], "seconds": time.perf_counter() - started}
    started = time.perf_counter()
    cache, _ = compact_model_on_policy(model, w.doc, query_ids, target, args.method)
    seconds = time.perf_counter() - started
    kl = continuation_kl(w, cache)
    rows["on-policy repeat"] = {"kl": kl, "seconds": seconds}
    report = {"suite": "on_policy", "meta": stamp(), "text": args.text, "ratio": args.ratio, "method": args.method,
              "rows": rows}
    md = "\n".join([f"# On-policy vs off-policy queries ({args.text}, ratio {args.ratio}, {args.method})", "",
                     f"`{report['meta']['command']}`", "",
                     *output.table(["queries", "continuation KL", "seconds"],
                                   [[k, f"{v['kl']:.4f}", f"{v['seconds']:.1f}"] for k, v in rows.items()])])
    output.write(report, "offline_on_policy", md)
    print(json.dumps(report, indent=1))
    return 0
