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
    python -m benchmarks offline --texts dev test --sources context --presets default quality paper
        # the corpus (benchmarks/common/corpus.py): TEST means with spread, DEV beside them
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from vllm_attnmatch.algorithms import BASELINES, METHODS, budget, compact, group_queries
from vllm_attnmatch.algorithms.highest_attention import RECONSTRUCTION
from vllm_attnmatch.algorithms.kvzip import reconstruction_scores
from vllm_attnmatch.algorithms.words import TokenPieces, word_ids, word_max
from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama
from vllm_attnmatch.algorithms.targets import compute_targets

from ..common import output, plots, sets, texts
from ..common.stamp import describe
from ..common.stamp import stamp as _stamp

REPEAT_PROMPT = "\n<|im_start|>user\nRepeat the previous context verbatim.<|im_end|>\n<|im_start|>assistant\n"
QUERY_FREE = ("streaming", "truncate", "random")  # same result whatever the query source


class Workload:
    """One text: tokens, full-cache reference, reference queries per source."""

    def __init__(self, model: ReferenceLlama, tokenizer, name: str, doc_tokens: int, cont_tokens: int,
                 sources: tuple[str, ...]):
        self.name = texts.display_name(name)
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
            _, self._repeat_cache, rq = model.prefill(seq)
            self.query_s["repeat"] = time.perf_counter() - t0
            start = len(self.doc) + len(mid)
            pos = torch.arange(start, len(seq))
            self.queries["repeat"] = [group_queries(q[start:], H, pos) for q in rq]
        self._key_scores: list[torch.Tensor] | None = None
        self.words = word_ids(TokenPieces(tokenizer.decode)(self.doc))  # for presets that score whole words

    def key_scores(self, layer: int) -> torch.Tensor:
        """KVzip's reconstruction score of the document's keys (what the served repeat source computes for
        ``reduction: reconstruction``), computed for every layer on first use only."""
        if self._key_scores is None:
            self._key_scores = [reconstruction_scores(q, kv.keys, p, len(self.doc), self.model.scale)
                                for (q, p), kv in zip(self.queries["repeat"], self._repeat_cache)]
        return self._key_scores[layer]


def run_one(w: Workload, method: str, ratio: float, source: str, options: dict | None = None,
            label: str | None = None) -> dict:
    """Compact every layer with ``method`` at ``ratio``, teacher-force C, return the metrics (``method``
    in the row is ``label`` when given: a named variant or preset of an AM method)."""
    options = dict(options or {})
    T = len(w.doc)
    t = budget(T, ratio=ratio)
    cache, out_err, mass_err, gates = [], [], [], []
    secs = 0.0
    for layer, kv in enumerate(w.cache):
        q, qpos = w.queries[source][layer]
        t0 = time.perf_counter()
        extra = {}
        if source == "repeat" and options.get("reduction") == RECONSTRUCTION:
            scores = w.key_scores(layer)
            extra["key_scores"] = word_max(scores, w.words) if options.get("words") else scores  # as served
        r = compact(kv.keys, kv.values, q, t, method, query_positions=qpos, key_positions=w.key_positions,
                    **options, **extra)
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
        "text": w.name, "set": sets.set_name(w.name), "source": source, "method": label or method,
        "base_method": method, "ratio": ratio, "target": t, "T": T,
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
    labels = list(dict.fromkeys(r["method"] for r in rows))
    for source in sorted({r["source"] for r in rows}):
        sub = [r for r in rows if r["source"] == source]
        lines += [f"## Summary over texts, {source} queries", ""]
        lines += sets.lines(sub, "kl", ".3f", "mean continuation KL", labels)
        lines += sets.lines(sub, "dnll_pct", "+.2f", "ΔNLL % of full NLL", labels)
    if any(r.get("options") for r in rows):
        lines += ["## Options of each variant", ""] + [
            f"- `{m}`: `{r.get('base_method', m)}` {json.dumps(r.get('options') or {})}" for m in labels
            for r in [next(x for x in rows if x["method"] == m)]] + [""]
    lines += ["## Per text", ""]
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    for text in sorted({r["text"] for r in rows}):
        for source in sorted({r["source"] for r in rows}):
            sub = [r for r in rows if r["text"] == text and r["source"] == source]
            if not sub:
                continue
            lines += [f"### {text} ({sets.set_name(text)}), {source} queries", "",
                      "| method | " + " | ".join(f"r={x}" for x in ratios) + " |",
                      "|---|" + "---|" * len(ratios)]
            for m in [m for m in labels if any(r["method"] == m for r in sub)]:
                cells = []
                for x in ratios:
                    c = [r for r in sub if r["method"] == m and r["ratio"] == x]
                    cells.append(f"{c[0]['kl']:.3f} / {c[0]['dnll_pct']:+.1f}" if c else "–")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines += ["", "| method (top-1 agree / attn out err / mass err / compact s) | "
                      + " | ".join(f"r={x}" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
            for m in [m for m in labels if any(r["method"] == m for r in sub)]:
                cells = []
                for x in ratios:
                    c = [r for r in sub if r["method"] == m and r["ratio"] == x]
                    fmt = lambda key, spec: f"{c[0][key]:{spec}}" if c[0].get(key) is not None else "–"  # noqa: E731
                    cells.append(f"{fmt('top1', '.3f')} / {fmt('attn_out_err', '.3f')} / {fmt('attn_mass_err', '.2f')} / "
                                 f"{fmt('compact_s', '.2f')}" if c else "–")
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
    out = {"text": texts.display_name(text), "T": len(ids), "ratio": ratio, "prefill_s": prefill_s, "methods": {}}
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
                    help="corpus names (benchmarks/common/corpus.py), dev | test | all, licence names or paths")
    ap.add_argument("--doc-tokens", type=int, default=1024)
    ap.add_argument("--cont-tokens", type=int, default=256)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.2, 0.1, 0.05, 0.02])
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help="methods with their defaults (none: only --variants / --presets)")
    ap.add_argument("--sources", nargs="+", default=["context", "repeat"], choices=["context", "repeat"])
    ap.add_argument("--options", default="{}", help="JSON options passed to compact() for AM methods")
    ap.add_argument("--variants", default=None,
                    help='JSON (or a .json path) {"label": {"method": "highest_attention", <compact() options>}}: '
                         "extra named AM variants, each reported as its own method")
    ap.add_argument("--presets", nargs="*", default=[],
                    help="bundled presets (or YAML paths) run with their method and algorithm options, reported "
                         "as preset:<name>")
    ap.add_argument("--prefix", default="offline_fidelity", help="output file stem in benchmarks/results/")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared 2-core machine 2 threads spin against other "
                         "jobs and ran 10x slower")
    ap.add_argument("--timing", type=int, nargs="*", metavar="T",
                    help="only time compaction of all layers at these context lengths (ratio = first --ratios)")
    ap.add_argument("--merge", nargs="+", metavar="STEM",
                    help="only merge the rows of these results files (stems in benchmarks/results/ or .json paths, "
                         "e.g. runs split over processes) into --prefix, with the per-set summary")
    ap.add_argument("--only", nargs="+", metavar="METHOD",
                    help="--merge: keep only the rows of these methods (labels)")
    ap.add_argument("--levers", nargs="+", metavar="STEM:VARIANT=LABEL", default=[],
                    help="--merge: also take the rows of a query-sources --offline study (e.g. an on-policy "
                         "variant, which this harness cannot run) under the method label LABEL")
    args = ap.parse_args(argv)
    if args.merge:
        rows, commands = [], []
        for stem in args.merge:
            data = json.loads(open(stem).read()) if stem.endswith(".json") else output.read(stem)
            if data is None:
                raise SystemExit(f"--merge: no results file {stem!r} in {output.RESULTS}")
            rows += data["rows"]
            commands += data.get("merged") or [data["meta"]["command"]]
        if args.only:
            rows = [r for r in rows if r["method"] in args.only]
        for spec in args.levers:
            stem, _, rest = spec.partition(":")
            variant, _, label = rest.partition("=")
            data = output.read(stem)
            if data is None or not label:
                raise SystemExit(f"--levers {spec!r}: give STEM:VARIANT=LABEL with a results stem of query-sources --offline")
            options = {**(data.get("config", {}).get("options") or {}), "queries": variant}
            taken = [dict(r, method=label, base_method=r["method"], source="context", options=options)
                     for r in data["rows"] if r.get("variant", r.get("source")) == variant]
            if not taken:
                raise SystemExit(f"--levers {spec!r}: no rows of variant {variant!r} in {stem}")
            rows += taken
            runs = data.get("meta", {}).get("merged") or [data["meta"]["command"]]
            commands += [f"{c}  ({variant} rows as {label})" for c in runs]
        # One row per cell: a cell measured again in a later file replaces the earlier one.
        rows = list({(r["text"], r["source"], r["method"], r["ratio"]): r for r in rows}.values())
        rows, dropped = complete_texts(rows)
        if dropped:
            print(f"left out (not every method × ratio measured, e.g. an interrupted run): {', '.join(dropped)}")
        print(write(rows, args.prefix, png=True, merged=commands, dropped=dropped))
        return
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
    names = texts.expand(args.texts)
    cells = [(m, m, am_options if m not in BASELINES else None) for m in args.methods]
    cells += variant_cells(args.variants) + [preset_cell(p) for p in args.presets]
    jobs = [(text, s, c, r) for text in names for s in args.sources for c in cells for r in args.ratios]
    bar = tqdm(total=len(jobs), desc="fidelity")
    for text in names:
        w = Workload(model, tok, text, args.doc_tokens, args.cont_tokens, tuple(args.sources))
        reuse: dict = {}
        for s in args.sources:
            for label, m, options in cells:
                for r in args.ratios:
                    if m in QUERY_FREE and label == m and (m, r) in reuse:
                        row = dict(reuse[(m, r)], source=s)
                    else:
                        row = run_one(w, m, r, s, options, label)
                        reuse[(m, r)] = row
                    rows.append(row)
                    write(rows, args.prefix, png=False)
                    bar.set_postfix_str(f"{w.name} {s} {label} r={r} kl={row['kl']:.3f}")
                    bar.update()
    bar.close()
    print(write(rows, args.prefix, png=True))


def variant_cells(spec: str | None) -> list[tuple[str, str, dict]]:
    """``(label, method, options)`` of the ``--variants`` JSON (inline or a path)."""
    if not spec:
        return []
    data = json.loads(open(spec).read() if spec.endswith(".json") else spec)
    out = []
    for label, opts in data.items():
        opts = dict(opts)
        method = opts.pop("method", "highest_attention")
        if method not in METHODS:
            raise SystemExit(f"--variants {label}: unknown method {method!r}; choose from {METHODS}")
        out.append((label, method, opts))
    return out


def preset_cell(name: str) -> tuple[str, str, dict]:
    """``(preset:<name>, method, options)``: what a server started with the preset runs on a request
    that only sets a ratio (its method and that method's algorithm options)."""
    from vllm_attnmatch.config import parse_server_config

    cfg = parse_server_config({"preset": name})
    if cfg.queries != "context":
        print(f"note: preset {name} uses {cfg.queries} queries on the served path; offline it runs on the "
              "--sources given")
    return f"preset:{name}", cfg.method, dict(cfg.algorithm_options(cfg.method))


def complete_texts(rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Only the texts with every (source, method, ratio) cell the rows hold for any text, so that every
    mean over a set is over the same texts; and the texts left out."""
    cells = {(r["source"], r["method"], r["ratio"]) for r in rows}
    have: dict[str, set] = {}
    for r in rows:
        have.setdefault(r["text"], set()).add((r["source"], r["method"], r["ratio"]))
    dropped = sorted(t for t, c in have.items() if c != cells)
    return [r for r in rows if r["text"] not in dropped], dropped


def write(rows, prefix, png: bool, merged: list[str] | None = None, dropped: list[str] | None = None) -> str:
    """Rewritten after every cell, so an interrupted run keeps what it measured."""
    meta = stamp()
    md = markdown(rows, meta)
    if merged:
        note = "Merged from the runs " + "; ".join(f"`{c}`" for c in merged) + "."
        if dropped:
            note += f" Left out, not measured with every method × ratio: {', '.join(dropped)}."
        md = md.replace("\n\n", f"\n\n{note}\n\n", 1)
    output.write({"suite": "offline", "meta": meta, "rows": rows, "merged": merged}, prefix, md,  # merged: commands
                 (lambda result, path: plots.offline(rows, path, list(dict.fromkeys(r["method"] for r in rows))))
                 if png else None)
    return md
