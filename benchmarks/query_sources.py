"""Reference-query sources and non-uniform head budgets, through the server.

Same protocol as the fidelity suite (document D then continuation C in one prompt with ``am_keep_last =
|C|``; C's prompt logprobs are scored after D is compacted): ``am_queries`` = context, repeat and
self_study at ratios 0.2, 0.1, 0.05, plus context queries with the bundled non-uniform head budgets
(``head_budgets``, a second server). Reported per cell: KL@20, ΔNLL %, top-1 agreement, the compaction's
seconds and the part of it spent producing the queries (``reference_query_seconds``).

    python benchmarks/query_sources.py                       # both texts, 3 ratios (~10 min on 2 cores)
    python benchmarks/query_sources.py --texts GPL-3 --ratios 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_fidelity import TEXTS, _metrics, _prompt_logprobs, score  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SOURCES = ("context", "repeat", "self_study")
HEAD_BUDGETS = "smollm2-135m"


def _cells(server, tokenizer, texts, ratios, variants, doc_tokens, cont_tokens, progress):
    cells = []
    for name in texts:
        ids = tokenizer(Path(TEXTS[name]).read_text())["input_ids"]
        doc, cont = ids[:doc_tokens], ids[doc_tokens : doc_tokens + cont_tokens]
        prompt = doc + cont
        full, full_s = _prompt_logprobs(server.url, "smollm2", prompt, None)
        for variant, source in variants:
            for ratio in ratios:
                before = _metrics(server.url)
                xargs = {"am_ratio": ratio, "am_queries": source, "am_keep_last": len(cont)}
                comp, _ = _prompt_logprobs(server.url, "smollm2", prompt, xargs)
                after = _metrics(server.url)
                cells.append({
                    "text": name, "variant": variant, "ratio": ratio, **score(full, comp, prompt, len(doc)),
                    "compactions": after["compactions"] - before["compactions"],
                    "compaction_s": after["compaction_seconds"] - before["compaction_seconds"],
                    "query_s": after["reference_query_seconds"] - before["reference_query_seconds"],
                    "tokens_after": after["tokens_after"] - before["tokens_after"],
                    "full_request_s": full_s,
                })
                progress.update()
    return cells


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.1, 0.05])
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--cont-tokens", type=int, default=256)
    ap.add_argument("--out", default="query_sources_latest")
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from vllm_attnmatch.launch import Server
    from vllm_attnmatch.model import ensure_model

    folder = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    total = len(args.texts) * len(args.ratios) * (len(SOURCES) + 1)
    progress = tqdm(total=total, desc="requests")
    cells = []
    for config, variants in (
        ({"preset": "default"}, [(s, s) for s in SOURCES]),
        ({"preset": "default", "head_budgets": HEAD_BUDGETS}, [(f"context + head_budgets={HEAD_BUDGETS}", "context")]),
    ):
        server = Server("query-sources", folder, {"attnmatch": config}, ["--enforce-eager"]).wait_ready()
        try:
            cells += _cells(server, tokenizer, args.texts, args.ratios, variants, args.doc_tokens, args.cont_tokens,
                            progress)
        finally:
            server.stop()
    progress.close()
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "doc_tokens": args.doc_tokens, "cont_tokens": args.cont_tokens, "texts": args.texts,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "cells": cells}, indent=1))
    variants = list(dict.fromkeys(c["variant"] for c in cells))
    lines = [
        f"Document {args.doc_tokens} tokens, continuation {args.cont_tokens}, mean over {', '.join(args.texts)}. "
        f"Cell: KL@20 / ΔNLL % / top-1 agreement; compaction seconds (of which producing queries). "
        f"`{meta['command']}`",
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

            row.append(f"{mean('kl_at_20'):.4f} / {mean('delta_nll_pct'):+.2f} / {mean('top1_agreement'):.3f}")
            secs.append((mean("compaction_s"), mean("query_s")))
        sec = sum(s for s, _ in secs) / len(secs)
        query = sum(q for _, q in secs) / len(secs)
        lines.append(f"| {variant} | " + " | ".join(row) + f" | {sec:.2f} ({query:.2f}) |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
