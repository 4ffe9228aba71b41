"""Reference-query sources and non-uniform head budgets, through the server.

Same protocol as the fidelity suite (document D then continuation C in one prompt with ``am_keep_last =
|C|``; C's prompt logprobs are scored after D is compacted): ``am_queries`` = context, repeat and
self_study at ratios 0.2, 0.1, 0.05, plus context queries with the bundled non-uniform head budgets
(``head_budgets``, a second server). Reported per cell: KL@20, ΔNLL %, top-1 agreement, the compaction's
seconds and the part of it spent producing the queries (``reference_query_seconds``).

    python -m benchmarks.query_sources                       # both texts, 3 ratios (~10 min on 2 cores)
    python -m benchmarks.query_sources --texts GPL-3 --ratios 0.1
"""

from __future__ import annotations

import argparse

from tqdm import tqdm

from benchmarks import output, texts
from benchmarks.scoring import score
from benchmarks.serving import Endpoint, delta
from benchmarks.stamp import describe, stamp

SOURCES = ("context", "repeat", "self_study")
HEAD_BUDGETS = "smollm2-135m"


def _cells(endpoint: Endpoint, tokenizer, names, ratios, variants, doc_tokens, cont_tokens, progress):
    cells = []
    for name in names:
        doc, cont = texts.split(texts.token_ids(tokenizer, name), doc_tokens, cont_tokens, name)
        prompt = doc + cont
        full, full_s = endpoint.prompt_logprobs(prompt)
        for variant, source in variants:
            for ratio in ratios:
                before = endpoint.metrics()
                xargs = {"am_ratio": ratio, "am_queries": source, "am_keep_last": len(cont)}
                comp, _ = endpoint.prompt_logprobs(prompt, xargs)
                after = endpoint.metrics()
                cells.append({
                    "text": name, "variant": variant, "ratio": ratio,
                    **score(full, comp, cont, len(doc), len(doc)),
                    "compactions": delta(before, after, "vllm_attnmatch_compactions_total"),
                    "compaction_s": delta(before, after, "vllm_attnmatch_compaction_seconds_total"),
                    "query_s": delta(before, after, "vllm_attnmatch_reference_query_seconds_total"),
                    "full_request_s": full_s,
                })
                progress.update()
    return cells


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", nargs="+", default=["GPL-3", "Apache-2.0"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.1, 0.05])
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--cont-tokens", type=int, default=256)
    ap.add_argument("--variants", nargs="+", default=[*SOURCES, "head_budgets"], choices=[*SOURCES, "head_budgets"])
    ap.add_argument("--out", default="query_sources_latest")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from benchmarks.launch import Server
    from vllm_attnmatch.model import ensure_model

    meta = stamp()
    folder = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    total = len(args.texts) * len(args.ratios) * len(args.variants)
    progress = tqdm(total=total, desc="requests")
    cells = []
    servers = (
        ({"preset": "default"}, [(s, s) for s in SOURCES if s in args.variants]),
        ({"preset": "default", "head_budgets": HEAD_BUDGETS}, [(f"context + head_budgets={HEAD_BUDGETS}", "context")]
         if "head_budgets" in args.variants else []),
    )
    for config, variants in servers:
        if not variants:
            continue
        server = Server("query-sources", folder, {"attnmatch": config}, ["--enforce-eager"]).wait_ready()
        try:
            cells += _cells(Endpoint(server.url), tokenizer, args.texts, args.ratios, variants, args.doc_tokens,
                            args.cont_tokens, progress)
        finally:
            server.stop()
    progress.close()
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    lines = [
        f"Document {args.doc_tokens} tokens, continuation {args.cont_tokens}, mean over {', '.join(args.texts)}. "
        f"Cell: KL@20 / ΔNLL % / top-1 agreement; compaction seconds (of which producing queries). "
        f"`{meta['command']}`",
        "",
        describe(meta),
        "",
        "| queries | " + " | ".join(f"r={r}" for r in args.ratios) + " | seconds (queries) |",
        "|---" * (len(args.ratios) + 2) + "|",
    ]
    for variant in variants:
        row, secs = [], []
        for ratio in args.ratios:
            sel = [c for c in cells if c["variant"] == variant and c["ratio"] == ratio]

            def mean(key, sel=sel):
                return sum(c[key] for c in sel) / len(sel)

            row.append(f"{mean('kl'):.4f} / {mean('delta_nll_pct'):+.2f} / {mean('top1_agreement'):.3f}")
            secs.append((mean("compaction_s"), mean("query_s")))
        sec = sum(s for s, _ in secs) / len(secs)
        query = sum(q for _, q in secs) / len(secs)
        lines.append(f"| {variant} | " + " | ".join(row) + f" | {sec:.2f} ({query:.2f}) |")
    config = {"doc_tokens": args.doc_tokens, "cont_tokens": args.cont_tokens, "texts": args.texts, "ratios": args.ratios}
    output.write({"suite": "query_sources", "meta": meta, "config": config, "cells": cells}, args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
