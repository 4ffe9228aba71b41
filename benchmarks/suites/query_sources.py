"""Reference-query sources and non-uniform head budgets, through the server; or (``--offline``) every
query-source lever through the independent reference forward, on the corpus sets.

Same protocol as the fidelity suite (document D then continuation C in one prompt with ``am_keep_last =
|C|``; C's prompt logprobs are scored after D is compacted): ``am_queries`` = context, repeat and
self_study at ratios 0.2, 0.1, 0.05, plus context queries with the bundled non-uniform head budgets
(``head_budgets``, a second server). Reported per cell: KL@20, ΔNLL %, top-1 agreement, the compaction's
seconds and the part of it spent producing the queries (``reference_query_seconds``).

    python -m benchmarks.suites.query_sources                       # both texts, 3 ratios (~10 min on 2 cores)
    python -m benchmarks.suites.query_sources --texts GPL-3 --ratios 0.1
    python -m benchmarks query-sources --offline --texts dev --ratios 0.1 0.05   # the levers (issue 12.3)

Offline variants (``--variants``): sources joined by ``+`` are mixed; ``context@N`` keeps N of the
document's own query tokens evenly spread (the engine's ``query_mix`` cap); ``ss_<family>`` is batched
self-study with a prompt family of ``worker/query_sources.PROMPT_FAMILIES``; ``repeat`` is repeat-prefill;
an ``onpolicy:`` prefix fits the synthetic part on-policy in one pass (``algorithms.on_policy``), the
context part staying off-policy. Reported per (variant, ratio): mean continuation KL over the texts with
min–max, ΔNLL %, wins against ``context``, and the seconds per compaction: producing the queries, the
fits, and the reference prefill of the same document (same threads) beside them.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from benchmarks.common import output, texts
from benchmarks.common.scoring import score
from benchmarks.common.serving import Endpoint, delta
from benchmarks.common.stamp import describe, stamp

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


OFFLINE_VARIANTS = ("context", "repeat", "ss_tasks", "ss_continue", "ss_mixed", "context+ss_continue",
                    "context+repeat", "onpolicy:repeat", "onpolicy:context+ss_continue")


def _offline_sources(w, model, decoder, tok, name: str, max_new_tokens: int):
    """Per-layer ungrouped ``(queries (n, H_q, d), positions (n,))`` of one source, its rows (for on-policy)
    and the seconds it took to produce them."""
    import time

    from vllm_attnmatch.worker.query_sources import build_prompts, self_study_batched

    T = len(w.doc)
    if name.startswith("context"):
        raise AssertionError("context queries come from the prefill")
    if name == "repeat":
        from .offline import REPEAT_PROMPT

        mid = tok(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
        row = mid + w.doc
        t0 = time.perf_counter()
        _, q = model.forward(row, [kv.clone() for kv in w.cache], T, return_queries=True)
        seconds = time.perf_counter() - t0
        pos = torch.arange(T + len(mid), T + len(row))
        return [(x[len(mid):], pos) for x in q], [(row, torch.arange(T, T + len(row)), len(mid))], seconds
    if name.startswith("ss_"):
        encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        prompts = build_prompts(name[3:], encode, w.doc)
        made = self_study_batched(decoder, w.cache, prompts, max_new_tokens, 600.0)
        rows = [(ids[hide:], pos[hide:], 0) for ids, pos, hide in made.info["rows"]]
        return [(q, made.positions) for q in made.queries], rows, made.seconds
    raise SystemExit(f"unknown query source {name!r} (context[@N], repeat, ss_<family>)")


def _evaluate(w, cache) -> dict:
    logits = w.model.forward(w.cont, cache, len(w.doc))
    logp = torch.log_softmax(logits.float(), -1)
    kl = float((w.full_logp.exp() * (w.full_logp - logp)).sum(-1).mean())
    tgt = torch.tensor(w.cont[1:])
    nll = float(-logp[:-1].gather(1, tgt[:, None]).mean())
    return {"kl": kl, "nll": nll, "dnll_pct": 100.0 * (nll - w.full_nll) / w.full_nll,
            "top1": float((logits.argmax(-1) == w.full_logits.argmax(-1)).float().mean())}


def _offline_text(model, decoder, tok, name, args, bar) -> list[dict]:
    import os
    import time

    from vllm_attnmatch.algorithms import budget, compact, group_queries
    from vllm_attnmatch.algorithms.on_policy import on_policy_pass
    from vllm_attnmatch.algorithms.reference_llama import LayerKV

    from .offline import Workload, run_one
    from ..common.sets import set_name

    w = Workload(model, tok, name, args.doc_tokens, args.cont_tokens, ("context",))
    T, H = len(w.doc), model.num_kv_heads
    g = model.num_heads // H
    # The document's own prefill queries, back in (n, H_q, d) from the Workload's grouped (H_kv, g·n, d).
    context = [(q.reshape(H, g, T, -1).permute(2, 0, 1, 3).reshape(T, H * g, -1), torch.arange(T))
               for q, _ in w.queries["context"]]
    made: dict[str, tuple] = {}
    rows_out = []
    load = os.getloadavg()[0]
    for variant in args.variants:
        on_policy = variant.startswith("onpolicy:")
        parts = variant.removeprefix("onpolicy:").split("+")
        fixed, synthetic, query_s, synth_rows = [], [], 0.0, []
        for part in parts:
            if part.startswith("context"):
                cap = int(part.split("@")[1]) if "@" in part else T
                keep = torch.linspace(0, T - 1, cap).round().long() if cap < T else torch.arange(T)
                fixed.append([(q[keep], pos[keep]) for q, pos in context])
            else:
                if part not in made:
                    made[part] = _offline_sources(w, model, decoder, tok, part, args.self_study_tokens)
                queries, rows, seconds = made[part]
                synthetic.append(queries)
                synth_rows += rows
                query_s += seconds

        def layer_queries(layer, extra=None):
            qs = [f[layer] for f in fixed] + [s[layer] for s in synthetic] + ([extra] if extra else [])
            return torch.cat([q for q, _ in qs]), torch.cat([p for _, p in qs])

        for ratio in args.ratios:
            t = budget(T, ratio=ratio)
            if not on_policy:
                w.queries[variant] = [group_queries(q, H, pos) for q, pos in map(layer_queries, range(model.num_layers))]
                w.query_s[variant] = query_s
                row = run_one(w, args.method, ratio, variant, args.options)
            else:
                if not synth_rows:
                    raise SystemExit(f"{variant}: on-policy needs a synthetic source (repeat or ss_*)")
                # a row's prompt tokens (repeat: the instruction) are fed but not used, as off-policy
                used = torch.cat([torch.arange(len(ids)) >= skip for ids, _, skip in synth_rows])

                def compact_layer(layer, q, pos, fixed=fixed, t=t, used=used):
                    qs = [f[layer] for f in fixed] + [(q[used], pos[used])]
                    gq, gpos = group_queries(torch.cat([x for x, _ in qs]), H, torch.cat([p for _, p in qs]))
                    kv = w.cache[layer]
                    r = compact(kv.keys, kv.values, gq, t, args.method, query_positions=gpos,
                                key_positions=w.key_positions, **args.options)
                    return LayerKV(r.keys, r.values, r.beta), r

                # the rows are teacher-forced as produced (repeat: its prompt too, queries of all tokens)
                rows = [(ids, pos) for ids, pos, _ in synth_rows]
                t0 = time.perf_counter()
                cache, _, _ = on_policy_pass(model, w.cache, rows, compact_layer)
                secs = time.perf_counter() - t0
                row = {"text": w.name, "set": set_name(w.name), "source": variant, "method": args.method,
                       "ratio": ratio, "target": t, "T": T, **_evaluate(w, cache), "full_nll": w.full_nll,
                       "compact_s": secs, "query_s": query_s, "prefill_s": w.prefill_s}
            row.update(variant=variant, load=load)
            rows_out.append(row)
            bar.set_postfix_str(f"{w.name} {variant} r={ratio} kl={row['kl']:.3f}")
            bar.update()
    return rows_out


def _offline_markdown(rows, meta, args) -> str:
    from ..common.output import fmt

    lines = [f"# Query-source levers, offline ({meta['utc']})", "", f"Command: `{meta['command']}`  ",
             f"{meta.get('machine', '')} · {args.threads} torch thread(s) · method {args.method} {json.dumps(getattr(args, 'options', {}))} · document "
             f"{args.doc_tokens} tokens, continuation {args.cont_tokens} · texts: {', '.join(args.texts)}", "",
             "Cell: mean continuation KL (min–max over texts) · ΔNLL % · texts where the variant beats `context` "
             "(lower KL). Seconds per compaction (mean over texts): producing the queries / compacting all "
             "layers (on-policy: the one pass incl. its fits) / reference prefill of the document (same "
             "threads; vLLM's own prefill is ~3-5x faster) · load average when the text ran.", "",
             "| variant | " + " | ".join(f"r={r}" for r in args.ratios) + " | query s | compact s | prefill s | load |",
             "|---|" + "---|" * (len(args.ratios) + 4)]
    for variant in list(dict.fromkeys(r["variant"] for r in rows)):
        cells, sub_all = [], [r for r in rows if r["variant"] == variant]
        for ratio in args.ratios:
            sub = [r for r in sub_all if r["ratio"] == ratio]
            if not sub:
                cells.append("–")
                continue
            base = {r["text"]: r["kl"] for r in rows if r["variant"] == "context" and r["ratio"] == ratio}
            wins = sum(1 for r in sub if r["text"] in base and r["kl"] < base[r["text"]])
            kls = [r["kl"] for r in sub]
            cells.append(f"{sum(kls) / len(kls):.4f} ({min(kls):.3f}–{max(kls):.3f}) · "
                         f"{sum(r['dnll_pct'] for r in sub) / len(sub):+.2f} · {wins}/{len(base)}")
        m = lambda k: sum(r[k] for r in sub_all) / len(sub_all)  # noqa: E731
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {fmt(m('query_s'), '.2f')} | "
                     f"{fmt(m('compact_s'), '.2f')} | {fmt(m('prefill_s'), '.2f')} | {fmt(m('load'), '.1f')} |")
    return "\n".join(lines)


def timing_main(args) -> None:
    """Seconds to produce each synthetic source at context lengths ``--timing``, next to the reference
    prefill of the same tokens (same threads) and vLLM's served prefill quoted in issue 12."""
    import os
    import time

    from vllm_attnmatch.algorithms import budget, compact, group_queries
    from vllm_attnmatch.algorithms.on_policy import on_policy_pass
    from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama
    from vllm_attnmatch.model import ensure_model
    from vllm_attnmatch.worker.query_sources import build_prompts, self_study_batched, self_study_queries

    from .offline import stamp as offline_stamp

    torch.set_num_threads(args.threads)
    folder = ensure_model()
    tok = texts.tokenizer(str(folder))
    model = ReferenceLlama.from_pretrained(folder)
    decoders = {"fp32": model.for_decoding(), "bf16": model.for_decoding(torch.bfloat16)}
    encode = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    results = []
    for T in args.timing:
        ids = texts.long_ids(tok, T)
        t0 = time.perf_counter()
        _, cache, _ = model.prefill(ids)
        res = {"T": T, "prefill_s": time.perf_counter() - t0, "load": os.getloadavg()[0], "sources": {}}
        for family in args.families:
            prompts = build_prompts(family, encode, ids)
            for dtype, decoder in decoders.items():
                made = self_study_batched(decoder, cache, prompts, args.self_study_tokens, 3600.0)
                res["sources"][f"ss_{family} batched {dtype}"] = made.seconds
            if T <= args.unbatched_max:
                plain = [list(p.ids) for p in prompts if not p.hide]
                t0 = time.perf_counter()
                self_study_queries(model, cache, T, plain, args.self_study_tokens, 3600.0)
                res["sources"][f"ss_{family} one prompt at a time fp32 ({len(plain)} prompts)"] = time.perf_counter() - t0
            # one-pass on-policy over those rows at ratio 0.1 (teacher-forced, fits included)
            rows = [(r[0][r[2]:], r[1][r[2]:]) for r in made.info["rows"]]
            t = budget(T, ratio=0.1)

            def compact_layer(layer, q, pos, t=t):
                gq, gpos = group_queries(q, model.num_kv_heads, pos)
                r = compact(cache[layer].keys, cache[layer].values, gq, t, query_positions=gpos,
                            key_positions=torch.arange(T))
                return LayerKV(r.keys, r.values, r.beta), r

            t0 = time.perf_counter()
            on_policy_pass(model, cache, rows, compact_layer)
            res["sources"][f"onpolicy:ss_{family} one pass incl. fits (r=0.1)"] = time.perf_counter() - t0
        results.append(res)
        print(res, flush=True)
    meta = offline_stamp()
    lines = [f"# Synthetic reference queries: seconds per compaction ({meta['utc']})", "",
             f"Command: `{meta['command']}`  ", f"{meta.get('machine', '')} · {args.threads} torch thread(s) · "
             f"{args.self_study_tokens} generated tokens per prompt", "",
             "Reference prefill = the independent torch forward of the same tokens (same threads). vLLM's own "
             "prefill on 2 idle cores (issue 12): ~1.7 s at 1k, ~4 s at 2k, ~6-10 s at 4k. Load = 1-min load "
             "average of the shared machine when the length ran.", "",
             "| T | load | reference prefill s | source | seconds | × reference prefill |", "|---|---|---|---|---|---|"]
    for r in results:
        for name, secs in r["sources"].items():
            lines.append(f"| {r['T']} | {r['load']:.1f} | {r['prefill_s']:.2f} | {name} | {secs:.2f} | "
                         f"{secs / r['prefill_s']:.2f} |")
    output.write({"suite": "query_levers_timing", "meta": meta, "results": results}, args.out, "\n".join(lines))
    print("\n".join(lines))


def merge_main(args) -> None:
    """One table from several ``--offline`` results files (the same variants and ratios, other texts)."""
    from .offline import stamp as offline_stamp

    parts = [output.read(stem) for stem in args.merge]
    if any(p is None for p in parts):
        raise SystemExit(f"--merge: missing results among {args.merge}")
    rows = [r for p in parts for r in p["rows"]]
    config = dict(parts[0]["config"])
    config["texts"] = [t for p in parts for t in p["config"]["texts"]]
    args = argparse.Namespace(**{**config, "out": args.out or "query_levers"})
    meta = {**offline_stamp(), "merged": [p["meta"]["command"] for p in parts]}
    md = _offline_markdown(rows, meta, args) + "\n\nMerged from:\n" + "\n".join(f"- `{c}`" for c in meta["merged"])
    output.write({"suite": "query_levers", "meta": meta, "config": config, "rows": rows}, args.out, md)
    print(md)


def offline_main(args) -> None:
    from tqdm import tqdm

    from vllm_attnmatch.algorithms.reference_llama import ReferenceLlama
    from vllm_attnmatch.model import ensure_model

    from .offline import stamp as offline_stamp

    torch.set_num_threads(args.threads)
    args.texts = texts.expand(args.texts)
    folder = ensure_model()
    tok = texts.tokenizer(str(folder))
    model = ReferenceLlama.from_pretrained(folder)
    decoder = model.for_decoding()
    bar = tqdm(total=len(args.texts) * len(args.variants) * len(args.ratios), desc="levers")
    rows: list[dict] = []
    for name in args.texts:
        rows += _offline_text(model, decoder, tok, name, args, bar)
        meta = offline_stamp()
        md = _offline_markdown(rows, meta, args)
        config = {k: v for k, v in vars(args).items() if k != "offline"}
        output.write({"suite": "query_levers", "meta": meta, "config": config, "rows": rows}, args.out, md)
    bar.close()
    print(md)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", nargs="+", default=["GPL-3", "Apache-2.0"])
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.2, 0.1, 0.05])
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--cont-tokens", type=int, default=256)
    ap.add_argument("--variants", nargs="+", help=f"server: {', '.join([*SOURCES, 'head_budgets'])} (all by "
                    f"default); --offline: see above (default {' '.join(OFFLINE_VARIANTS)})")
    ap.add_argument("--out", help="results stem (default query_sources_latest; --offline: query_levers)")
    ap.add_argument("--offline", action="store_true", help="the reference forward instead of a server")
    ap.add_argument("--method", default="highest_attention", help="--offline: the AM method")
    ap.add_argument("--options", type=json.loads, default={},
                    help='--offline: JSON compact() options of the method (e.g. \'{"recent": 0.5}\')')
    ap.add_argument("--self-study-tokens", type=int, default=48, help="--offline: generated tokens per prompt")
    ap.add_argument("--threads", type=int, default=1, help="--offline: torch threads")
    ap.add_argument("--timing", type=int, nargs="+", metavar="T",
                    help="--offline: only the seconds to produce synthetic queries at these context lengths")
    ap.add_argument("--families", nargs="+", default=["tasks", "continue"], help="--timing: prompt families")
    ap.add_argument("--unbatched-max", type=int, default=1024,
                    help="--timing: also time one prompt at a time up to this length")
    ap.add_argument("--merge", nargs="+", metavar="STEM",
                    help="--offline: only merge the rows of these results files (runs split over processes)")
    args = ap.parse_args(argv)
    if args.offline and args.merge:
        return merge_main(args)
    if args.offline and args.timing:
        args.out = args.out or "query_levers_timing"
        return timing_main(args)
    if args.offline:
        args.variants = args.variants or list(OFFLINE_VARIANTS)
        args.out = args.out or "query_levers"
        return offline_main(args)
    args.variants = args.variants or [*SOURCES, "head_budgets"]
    args.out = args.out or "query_sources_latest"
    if unknown := set(args.variants) - {*SOURCES, "head_budgets"}:
        ap.error(f"--variants: unknown {sorted(unknown)} (allowed: {', '.join([*SOURCES, 'head_budgets'])})")
    from transformers import AutoTokenizer

    from harness.server import Server
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
        server = Server("query-sources", folder, {"attnmatch": config}, ["--enforce-eager"], dumps=False).wait_ready()
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
