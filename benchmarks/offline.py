"""Offline fidelity of KV compaction on the bundled model: every method × ratio × text × query source.

What it measures (no vLLM; an independent pure-torch forward, ``vllm_attnmatch.algorithms.reference_llama``):
a real text is split into a document D (``--doc-tokens``) and a continuation C (``--cont-tokens``). D is
prefilled, every layer's cache is compacted, then C is teacher-forced over the compacted cache at logical
positions. Reported against the full cache: mean per-token KL(p_full ‖ p_compacted), ΔNLL (% of full NLL),
teacher-forced top-1 agreement, attention-level errors on the continuation's own queries (truly held out:
relative output error and RMS log-mass error of each compacted block, mean over layers and KV heads), and
the seconds to compact all layers. Query sources: ``context`` (D's own prefill queries, causal targets) and
``repeat`` (repeat-prefill: D + "Repeat the previous context verbatim." + D, queries of the second copy).

Writes ``benchmarks/results/<prefix>.json``, ``.md`` and ``.png`` stamped with machine, versions and command.

    python -m benchmarks offline                       # the full grid (~15 min on 2 cores)
    python -m benchmarks offline --ratios 0.1 --methods highest_attention h2o --texts GPL-3
    python -m benchmarks offline --timing 1024 4096    # only compaction time vs the reference prefill
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vllm_attnmatch.algorithms import BASELINES, METHODS, budget, compact, group_queries
from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama
from vllm_attnmatch.algorithms.targets import compute_targets

from . import output, plots, texts
from .stamp import describe
from .stamp import stamp as _stamp

REPEAT_PROMPT = "\n<|im_start|>user\nRepeat the previous context verbatim.<|im_end|>\n<|im_start|>assistant\n"
QUERY_FREE = ("streaming", "truncate", "random")  # same result whatever the query source


class Workload:
    """One text: tokens, full-cache reference, reference queries per source."""

    def __init__(self, model: ReferenceLlama, tokenizer, name: str, doc_tokens: int, cont_tokens: int,
                 sources: tuple[str, ...]):
        self.name = texts.path_of(name).name
        self.model = model
        self.doc, self.cont = texts.split(texts.token_ids(tokenizer, name), doc_tokens, cont_tokens, name)
        t0 = time.perf_counter()
        _, self.cache, qs = model.prefill(self.doc)
        self.prefill_s = time.perf_counter() - t0
        cache = [kv.clone() for kv in self.cache]
        self.full_logits, cont_q = model.forward(self.cont, cache, len(self.doc), return_queries=True)
        self.full_logp = F.log_softmax(self.full_logits.float(), -1)
        tgt = torch.tensor(self.cont[1:])
        self.full_nll = float(-self.full_logp[:-1].gather(1, tgt[:, None]).mean())
        H = model.num_kv_heads
        self.eval_queries = [group_queries(q, H)[0] for q in cont_q]  # continuation queries: truly held out
        self.key_positions = torch.arange(len(self.doc))
        self.queries: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.query_s: dict[str, float] = {}
        if "context" in sources:
            self.queries["context"] = [group_queries(q, H, torch.arange(len(self.doc))) for q in qs]
            self.query_s["context"] = 0.0  # a by-product of the prefill
        if "repeat" in sources:
            mid = tokenizer(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
            seq = self.doc + mid + self.doc
            t0 = time.perf_counter()
            _, _, rq = model.prefill(seq)
            self.query_s["repeat"] = time.perf_counter() - t0
            start = len(self.doc) + len(mid)
            pos = torch.arange(start, len(seq))
            self.queries["repeat"] = [group_queries(q[start:], H, pos) for q in rq]


def run_one(w: Workload, method: str, ratio: float, source: str, options: dict | None = None) -> dict:
    """Compact every layer with ``method`` at ``ratio``, teacher-force C, return the metrics."""
    options = dict(options or {})
    T = len(w.doc)
    t = budget(T, ratio=ratio)
    cache, out_err, mass_err, gates = [], [], [], []
    secs = 0.0
    for layer, kv in enumerate(w.cache):
        q, qpos = w.queries[source][layer]
        t0 = time.perf_counter()
        r = compact(kv.keys, kv.values, q, t, method, query_positions=qpos, key_positions=w.key_positions,
                    **options)
        secs += time.perf_counter() - t0
        cache.append(LayerKV(r.keys, r.values, r.beta))
        if r.gate is not None:
            gates.append(r.gate.float())
        # attention-level error on the continuation's queries (all keys of D visible to them)
        eq = w.eval_queries[layer]
        full = compute_targets(kv.keys, kv.values, eq, w.model.scale)
        comp = compute_targets(r.keys, r.values, eq, w.model.scale, bias=r.beta)
        out_err.append(float(((comp.output - full.output).norm(dim=-1) / full.output.norm(dim=-1).clamp_min(1e-9)).mean()))
        mass_err.append(float((comp.log_mass - full.log_mass).pow(2).mean().sqrt()))
    logits = w.model.forward(w.cont, cache, T)
    logp = F.log_softmax(logits.float(), -1)
    kl = float((w.full_logp.exp() * (w.full_logp - logp)).sum(-1).mean())
    tgt = torch.tensor(w.cont[1:])
    nll = float(-logp[:-1].gather(1, tgt[:, None]).mean())
    top1 = float((logits.argmax(-1) == w.full_logits.argmax(-1)).float().mean())
    max_abs_v = max(float(kv.values.abs().max()) for kv in cache)
    return {
        "text": w.name, "source": source, "method": method, "ratio": ratio, "target": t, "T": T,
        "kl": kl, "nll": nll, "full_nll": w.full_nll, "dnll_pct": 100.0 * (nll - w.full_nll) / w.full_nll,
        "top1": top1, "attn_out_err": sum(out_err) / len(out_err), "attn_mass_err": sum(mass_err) / len(mass_err),
        "compact_s": secs, "query_s": w.query_s[source], "prefill_s": w.prefill_s,
        "fitted_head_share": (float(torch.cat(gates).gt(0).float().mean()) if gates else None),
        "max_abs_value": max_abs_v, "options": options,
    }


def stamp() -> dict:
    """The shared stamp plus the torch thread count (it decides the timings here)."""
    return {**_stamp(), "torch_threads": torch.get_num_threads()}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Offline fidelity ({meta['utc']})", "", f"Command: `{meta['command']}`  ",
             f"{describe(meta)} · {meta['torch_threads']} torch threads", "",
             "Cell: mean continuation KL(full‖compacted) / ΔNLL % of full NLL. Lower is better.", ""]
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    for text in sorted({r["text"] for r in rows}):
        for source in sorted({r["source"] for r in rows}):
            sub = [r for r in rows if r["text"] == text and r["source"] == source]
            if not sub:
                continue
            lines += [f"## {text}, {source} queries", "",
                      "| method | " + " | ".join(f"r={x}" for x in ratios) + " |",
                      "|---|" + "---|" * len(ratios)]
            for m in [m for m in METHODS if any(r["method"] == m for r in sub)]:
                cells = []
                for x in ratios:
                    c = [r for r in sub if r["method"] == m and r["ratio"] == x]
                    cells.append(f"{c[0]['kl']:.3f} / {c[0]['dnll_pct']:+.1f}" if c else "–")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines += ["", "| method (top-1 agree / attn out err / mass err / compact s) | "
                      + " | ".join(f"r={x}" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
            for m in [m for m in METHODS if any(r["method"] == m for r in sub)]:
                cells = []
                for x in ratios:
                    c = [r for r in sub if r["method"] == m and r["ratio"] == x]
                    cells.append(f"{c[0]['top1']:.3f} / {c[0]['attn_out_err']:.3f} / {c[0]['attn_mass_err']:.2f} / "
                                 f"{c[0]['compact_s']:.2f}" if c else "–")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def timing(model, tok, text: str, T: int, ratio: float, methods, options: dict | None = None, repeats: int = 1) -> dict:
    """Seconds to compact all layers at ``T`` tokens next to the prefill of those tokens."""
    ids = texts.token_ids(tok, text)[:T]
    t0 = time.perf_counter()
    _, cache, qs = model.prefill(ids)
    prefill_s = time.perf_counter() - t0
    H = model.num_kv_heads
    grouped = [group_queries(q, H, torch.arange(len(ids))) for q in qs]
    out = {"text": texts.path_of(text).name, "T": len(ids), "ratio": ratio, "prefill_s": prefill_s, "methods": {}}
    for m in methods:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for kv, (q, qp) in zip(cache, grouped):
                compact(kv.keys, kv.values, q, budget(len(ids), ratio=ratio), m, query_positions=qp,
                        key_positions=torch.arange(len(ids)), **(options if m not in BASELINES else {}))
            best = min(best, time.perf_counter() - t0)
        out["methods"][m] = {"compact_s": best, "share_of_prefill": best / prefill_s}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks offline", description=__doc__.split("\n")[0])
    ap.add_argument("--texts", nargs="+", default=["GPL-3", "Apache-2.0"],
                    help="files in /usr/share/common-licenses (or paths)")
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--cont-tokens", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.02])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--sources", nargs="+", default=["context", "repeat"], choices=["context", "repeat"])
    ap.add_argument("--options", default="{}", help="JSON options passed to compact() for AM methods")
    ap.add_argument("--prefix", default="offline_fidelity", help="output file stem in benchmarks/results/")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared 2-core machine 2 threads spin against other "
                         "jobs and ran 10x slower")
    ap.add_argument("--timing", type=int, nargs="*", metavar="T",
                    help="only time compaction of all layers at these context lengths (ratio = first --ratios)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from vllm_attnmatch.model import ensure_model

    folder = ensure_model()
    model = ReferenceLlama.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    am_options = json.loads(args.options)
    if args.timing is not None:
        meta = stamp()
        res = [timing(model, tok, args.texts[0], T, args.ratios[0], args.methods, am_options)
               for T in (args.timing or [1024, 4096])]
        lines = [f"# Compaction time, all {model.num_layers} layers ({meta['utc']})", "", f"Command: `{meta['command']}`  ",
                 (f"AM options: `{json.dumps(am_options)}` (defaults where empty). Prefill = the reference torch "
                  "forward of the same tokens, same threads.  "),
                 f"{describe(meta)} · {meta['torch_threads']} torch threads", "",
                 "| T | ratio | prefill s | method | compact s | share of prefill |",
                 "|---|---|---|---|---|---|"]
        for r in res:
            for m, v in r["methods"].items():
                lines.append(f"| {r['T']} | {r['ratio']} | {r['prefill_s']:.2f} | {m} | {v['compact_s']:.2f} | "
                             f"{100 * v['share_of_prefill']:.1f} % |")
        output.write({"suite": "offline_timing", "meta": meta, "timing": res}, args.prefix, "\n".join(lines))
        print("\n".join(lines))
        return
    rows = []
    jobs = [(text, s, m, r) for text in args.texts for s in args.sources for m in args.methods for r in args.ratios]
    bar = tqdm(total=len(jobs), desc="fidelity")
    for text in args.texts:
        w = Workload(model, tok, text, args.doc_tokens, args.cont_tokens, tuple(args.sources))
        reuse: dict = {}
        for s in args.sources:
            for m in args.methods:
                for r in args.ratios:
                    if m in QUERY_FREE and (m, r) in reuse:
                        row = dict(reuse[(m, r)], source=s)
                    else:
                        row = run_one(w, m, r, s, am_options if m not in BASELINES else None)
                        reuse[(m, r)] = row
                    rows.append(row)
                    write(rows, args.prefix, png=False)
                    bar.set_postfix_str(f"{w.name} {s} {m} r={r} kl={row['kl']:.3f}")
                    bar.update()
    bar.close()
    print(write(rows, args.prefix, png=True))


def write(rows, prefix, png: bool) -> str:
    """Rewritten after every cell, so an interrupted run keeps what it measured."""
    meta = stamp()
    md = markdown(rows, meta)
    output.write({"suite": "offline", "meta": meta, "rows": rows}, prefix, md,
                 (lambda result, path: plots.offline(rows, path, METHODS)) if png else None)
    return md
