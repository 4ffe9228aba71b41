"""Fidelity, cost and memory of compaction *through the server*, for AM and every baseline.

For a real text split into a document D (a whole number of KV blocks) and a continuation C, one request
per (method, ratio) sends ``D + C`` with ``am_keep_last = |C|``: the engine prefills D, compacts it, then
prefills C over the compacted cache, and vLLM's prompt logprobs of C are therefore scored *after*
compaction. The same prompt without ``am_*`` keys is the full-context reference.

Per cell: ΔNLL of C (% of the full NLL), teacher-forced top-1 agreement with the full context, KL@20
(KL(full ‖ compacted) over the full context's 20 most likely tokens; a compacted logprob missing from
its own top 20 is bounded by its 20th, so KL@20 is a lower bound of the true KL), compaction seconds
(worker side, from /metrics) next to the full request's prefill seconds, and KV entries before/after.

    python benchmarks/serve_fidelity.py                      # starts its own server on the bundled model
    python benchmarks/serve_fidelity.py --url http://host:8000 --model smollm2
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"
TEXTS = {
    "GPL-3": "/usr/share/common-licenses/GPL-3",
    "Apache-2.0": "/usr/share/common-licenses/Apache-2.0",
}
METHODS = ("highest_attention", "omp", "snapkv", "h2o", "streaming", "truncate", "random")
RATIOS = (0.5, 0.2, 0.1, 0.05)
TOP = 20


def _prompt_logprobs(url, model, prompt_ids, xargs):
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": TOP}
    if xargs:
        body["vllm_xargs"] = xargs
    started = time.perf_counter()
    response = requests.post(url + "/v1/completions", json=body, timeout=3600)
    response.raise_for_status()
    seconds = time.perf_counter() - started
    rows = response.json()["choices"][0]["prompt_logprobs"]
    return [{int(k): v["logprob"] for k, v in row.items()} if row else None for row in rows], seconds


def _metrics(url):
    values = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm_attnmatch_") and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name.removeprefix("vllm_attnmatch_").removesuffix("_total")] = float(value)
    return values


def score(full_rows, comp_rows, tokens, start):
    """ΔNLL %, top-1 agreement and KL@20 over positions ``start..`` of the prompt."""
    nll_full = nll_comp = kl = agree = 0.0
    count = 0
    for pos in range(start, len(tokens)):
        full, comp, token = full_rows[pos], comp_rows[pos], tokens[pos]
        nll_full -= full[token]
        nll_comp -= comp[token]
        agree += max(full, key=full.get) == max(comp, key=comp.get)
        floor = min(comp.values())
        top_full = sorted(full, key=full.get, reverse=True)[:TOP]
        kl += sum(math.exp(full[i]) * (full[i] - comp.get(i, floor)) for i in top_full)
        count += 1
    return {
        "delta_nll_pct": 100.0 * (nll_comp - nll_full) / nll_full,
        "nll_full": nll_full / count,
        "top1_agreement": agree / count,
        "kl_at_20": kl / count,
    }


def run(args) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cells = []
    jobs = [(name, method, ratio) for name in args.texts for method in args.methods for ratio in args.ratios]
    progress = tqdm(total=len(jobs) + len(args.texts), desc="requests")
    for name in args.texts:
        ids = tokenizer(Path(TEXTS[name]).read_text())["input_ids"]
        doc, cont = ids[: args.doc_tokens], ids[args.doc_tokens : args.doc_tokens + args.cont_tokens]
        prompt = doc + cont
        full, full_s = _prompt_logprobs(args.url, args.model, prompt, None)
        progress.update()
        for method in args.methods:
            for ratio in args.ratios:
                before = _metrics(args.url)
                xargs = {"am_ratio": ratio, "am_method": method, "am_keep_last": len(cont)}
                comp, comp_s = _prompt_logprobs(args.url, args.model, prompt, xargs)
                after = _metrics(args.url)
                cell = {"text": name, "method": method, "ratio": ratio, **score(full, comp, prompt, len(doc))}
                cell.update(
                    compactions=after["compactions"] - before["compactions"],
                    compaction_s=after["compaction_seconds"] - before["compaction_seconds"],
                    tokens_before=after["tokens_before"] - before["tokens_before"],
                    tokens_after=after["tokens_after"] - before["tokens_after"],
                    request_s=comp_s,
                    full_request_s=full_s,
                )
                cells.append(cell)
                progress.update()
    progress.close()
    return {"cells": cells}


def table(cells, methods, ratios, key, fmt) -> list[str]:
    lines = ["| method | " + " | ".join(f"r={r}" for r in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for method in methods:
        row = []
        for ratio in ratios:
            values = [c[key] for c in cells if c["method"] == method and c["ratio"] == ratio]
            row.append(fmt.format(sum(values) / len(values)) if values else "–")
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def write(result, args, stamp) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / f"serve_fidelity_{stamp}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1))
    cells = result["cells"]
    md = [
        f"# Fidelity through the server ({result['meta']['date']})",
        "",
        f"Command: `{result['meta']['command']}`  ",
        f"Machine: {result['meta']['machine']}; vLLM {result['meta']['vllm']}; texts {', '.join(args.texts)}; "
        f"document {args.doc_tokens} tokens, continuation {args.cont_tokens}; mean over texts.",
        "",
        "## ΔNLL of the continuation (% of full-context NLL; lower is better)",
        *table(cells, args.methods, args.ratios, "delta_nll_pct", "{:+.2f}"),
        "",
        "## KL@20 (full ‖ compacted), per token",
        *table(cells, args.methods, args.ratios, "kl_at_20", "{:.4f}"),
        "",
        "## Teacher-forced top-1 agreement with full context",
        *table(cells, args.methods, args.ratios, "top1_agreement", "{:.3f}"),
        "",
        "## Compaction seconds (all layers, worker side)",
        *table(cells, args.methods, args.ratios, "compaction_s", "{:.2f}"),
        "",
        f"Full-context request (prefill of {args.doc_tokens + args.cont_tokens} tokens + 1 token) took "
        + ", ".join(f"{c['full_request_s']:.2f} s" for c in {c['text']: c for c in cells}.values())
        + ". KV entries after compaction (mean, document part): "
        + ", ".join(
            f"r={r}: {sum(c['tokens_after'] for c in cells if c['ratio'] == r) / max(1, sum(1 for c in cells if c['ratio'] == r)):.0f}"
            f" of {args.doc_tokens}"
            for r in args.ratios
        ),
    ]
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for method in args.methods:
            for ax, key in zip(axes, ("delta_nll_pct", "kl_at_20")):
                ys = [
                    sum(c[key] for c in cells if c["method"] == method and c["ratio"] == r)
                    / max(1, sum(1 for c in cells if c["method"] == method and c["ratio"] == r))
                    for r in args.ratios
                ]
                ax.plot(args.ratios, ys, marker="o", label=method, lw=2.5 if method in ("highest_attention", "omp") else 1)
        for ax, label in zip(axes, ("ΔNLL % (continuation)", "KL@20 per token")):
            ax.set_xscale("log")
            ax.set_xlabel("kept ratio")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle("Fidelity through the vLLM server vs kept ratio")
        fig.tight_layout()
        fig.savefig(base.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    return base


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="use a running server (default: start one on the bundled model)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the bundled model)")
    parser.add_argument("--texts", nargs="+", default=list(TEXTS), choices=list(TEXTS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--doc-tokens", type=int, default=1024, help="a multiple of the KV block size")
    parser.add_argument("--cont-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    import vllm

    from vllm_attnmatch.launch import Server
    from vllm_attnmatch.model import ensure_model

    server = None
    if args.tokenizer is None:
        args.tokenizer = str(ensure_model())
    if args.url is None:
        server = Server("bench", ensure_model(), {"attnmatch": {"preset": "default"}}, kv_cache_gib=2)
        args.url = server.wait_ready().url
    try:
        result = run(args)
    finally:
        if server is not None:
            server.stop()
    result["meta"] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {platform.system()}",
        "vllm": vllm.__version__,
    }
    base = write(result, args, "latest")
    print(base.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
