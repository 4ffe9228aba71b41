"""Task accuracy after compaction, offline: does a compacted document still answer questions about it?

How (no vLLM; the independent torch forward ``ReferenceLlama``): each task's document (``benchmarks.common.tasks``)
is prefilled **without** any question, every layer's cache is compacted by a *cell* (a method, its query
source and options), then each question is appended after the compacted cache at its logical position
and answered greedily (several questions of one document as one batch over the shared compacted cache:
compact once, ask many). Full-context accuracy is measured on the same documents first; retention is
compacted accuracy / full accuracy. Intervals: 90 % percentile bootstrap over questions.

Cells (``CELLS``; ``--cells`` picks some, ``--variants`` adds JSON ones):
- ``full``: the uncompacted cache;
- published baselines at their strength, each with the same 4 sinks and the same budget: ``snapkv``,
  ``h2o``, ``tova``, ``streaming``, and ``kvzip`` (max attention of the repeat-prefill's queries over the
  whole repeated sequence, :mod:`vllm_attnmatch.algorithms.kvzip`);
- ``default``: the served ``default`` preset's algorithm (OMP, half the budget recent, context queries);
- the levers of issue 18 (score reduction, query source, recent share, spans, the fit).

    python -m benchmarks recall --set dev --formats single_fact multi_fact --tokens 1024 --trials 12
    python -m benchmarks recall --set test --cells full kvzip documents default snapkv h2o --ratios 0.25 0.1

Writes ``benchmarks/results/recall_<tag>.json`` and ``.md`` stamped with machine, versions and command.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from vllm_attnmatch.algorithms import budget, compact, group_queries
from vllm_attnmatch.algorithms.kvzip import reconstruction_scores
from vllm_attnmatch.algorithms.words import word_ids, word_max
from vllm_attnmatch.algorithms.reference_llama import LayerKV, PrefixBatch, ReferenceLlama
from vllm_attnmatch.worker.query_sources import Prompt, repeat_queries, self_study_batched

from ..common import output, sets, tasks, texts
from .offline import REPEAT_PROMPT
from ..common.stamp import describe, stamp

#: Self-study prompts of the probe (chat turns after the document): what a reader would note down.
STUDY_PROMPTS = (
    "<|im_end|>\n<|im_start|>user\nList the key facts stated in the document above, with names and numbers exactly as written.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_end|>\n<|im_start|>user\nWrite three questions that the document above answers, with their answers.<|im_end|>\n<|im_start|>assistant\n",
)
STUDY_TOKENS = 64

NO_FIT = {"fit_beta": False, "fit_values": False, "gate": False, "evaluate": False}


@dataclass(frozen=True)
class Cell:
    """How one compaction is made: ``method`` over queries of ``source`` (``context`` | ``repeat``), with
    ``options`` for :func:`compact`; ``scores="kvzip"`` selects by the KVzip reconstruction score."""

    method: str
    source: str = "context"
    options: dict = field(default_factory=dict, hash=False)
    scores: str | None = None


#: Every cell this study knows. The baselines run at their published strength; ``default`` is the served
#: ``default`` preset's algorithm; the rest are the levers (issue 18), named by what they change.
CELLS: dict[str, Cell | None] = {
    "full": None,
    "snapkv": Cell("snapkv"),
    "h2o": Cell("h2o"),
    "tova": Cell("tova"),
    "streaming": Cell("streaming"),
    "kvzip": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip"),
    "default": Cell("omp", "context", {"recent": 0.5, "max_queries": 1024}),
    "ha_sum_ctx": Cell("highest_attention", "context", {"reduction": "sum", "recent": 0.5}),
    "ha_max_ctx": Cell("highest_attention", "context", {"reduction": "max", "recent": 0.1}),
    "ha_max_rep": Cell("highest_attention", "repeat", {"reduction": "max", "recent": 0.1, "query_gap": 0}),
    "ha_max_rep_nofit": Cell("highest_attention", "repeat", {"reduction": "max", "recent": 0.1, "query_gap": 0, **NO_FIT}),
    "kvzip_fit_ctx": Cell("highest_attention", "context", {"recent": 0.0}, scores="kvzip"),
    "kvzip_fit_rep": Cell("highest_attention", "repeat", {"recent": 0.0, "query_gap": 0}, scores="kvzip"),
    "kvzip_pool3": Cell("highest_attention", "repeat", {"recent": 0.0, "pool": 3, **NO_FIT}, scores="kvzip"),
    "kvzip_recent": Cell("highest_attention", "repeat", {"recent": 0.1, **NO_FIT}, scores="kvzip"),
    "surprisal": Cell("highest_attention", "context", {"recent": 0.0, **NO_FIT}, scores="surprisal"),
    "kvzip_surprisal": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_surprisal"),
    "kvzip_surprisal_fit": Cell("highest_attention", "repeat", {"recent": 0.0, "query_gap": 0}, scores="kvzip_surprisal"),
    "study": Cell("highest_attention", "self_study", {"recent": 0.0, **NO_FIT}, scores="study"),
    "kvzip_study": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_study"),
    "kvzip_study_fit": Cell("highest_attention", "repeat", {"recent": 0.0, "query_gap": 0}, scores="kvzip_study"),
    "omp_rep": Cell("omp", "repeat", {"recent": 0.1, "max_queries": 1024, "query_gap": 0}),
    # One selection shared by heads (and layers), so a fact is kept everywhere or nowhere
    # (recall_dev_global: run as variants layer, g_mean, g_rank, g_max, g_mean_pool5).
    # The served `documents` preset (vllm_attnmatch/configs/documents.yaml): KVzip by whole words, no fit.
    "documents": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_words"),
    "kvzip_words": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_words"),
    "kvzip_words_fit": Cell("highest_attention", "repeat", {"recent": 0.0, "query_gap": 0}, scores="kvzip_words"),
    "kvzip_shared_layer": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_layer"),
    "kvzip_shared_mean": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_global_mean"),
    "kvzip_shared_rank": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_global_rank"),
    "kvzip_shared_max": Cell("highest_attention", "repeat", {"recent": 0.0, **NO_FIT}, scores="kvzip_global_max"),
    "kvzip_shared_mean_pool5": Cell("highest_attention", "repeat", {"recent": 0.0, "pool": 5, **NO_FIT},
                                    scores="kvzip_global_mean"),
    # KVzip, then the document re-read over that cache: the tokens it fails to reproduce (largest loss) take
    # a share of the budget in every layer and head (recall_dev_check: run as variants check25, check50, check50w2).
    "kvzip_reread_check25": Cell("highest_attention", "repeat", {"recent": 0.0, "check_share": 0.25, **NO_FIT},
                                 scores="check"),
    "kvzip_reread_check50": Cell("highest_attention", "repeat", {"recent": 0.0, "check_share": 0.5, **NO_FIT},
                                 scores="check"),
}


class Document:
    """One task's document prefilled once: its cache, the reference queries of each source, KVzip scores."""

    def __init__(self, model: ReferenceLlama, tok, task: tasks.Task, need_repeat: bool, need_study: bool = False):
        self.task = task
        self.model = model
        self.tok = tok
        self.ids = tok(task.document, add_special_tokens=False)["input_ids"]
        self.T = len(self.ids)
        H = model.num_kv_heads
        t0 = time.perf_counter()
        logits, self.cache, qs = model.prefill(self.ids)
        self.prefill_s = time.perf_counter() - t0
        # Surprisal of each token on the first read (what the model could not have predicted): nats, 0 for the first.
        logp = torch.log_softmax(logits[:-1].float(), -1)
        nll = -logp.gather(1, torch.tensor(self.ids[1:])[:, None]).squeeze(1)
        self.surprisal = torch.cat([torch.zeros(1), nll])
        self.queries = {"context": [group_queries(q, H, torch.arange(self.T)) for q in qs]}
        self.kvzip: list[torch.Tensor] | None = None
        self.repeat_s = 0.0
        if need_repeat:
            t0 = time.perf_counter()
            # The served repeat source itself: the repetition over the document's own cache, with KVzip scores.
            made = repeat_queries(model, self.cache, self.ids, tok(REPEAT_PROMPT, add_special_tokens=False)["input_ids"],
                                  self.T, key_scores=True)
            self.queries["repeat"] = [group_queries(q, H, made.positions) for q in made.queries]
            self.kvzip = made.info["key_scores"]
            self.repeat_s = time.perf_counter() - t0
        self.study: list[torch.Tensor] | None = None
        self.study_s = 0.0
        if need_study:
            t0 = time.perf_counter()
            prompts = [Prompt(tuple(tok(p, add_special_tokens=False)["input_ids"]), self.T) for p in STUDY_PROMPTS]
            gen = self_study_batched(model, self.cache, prompts, STUDY_TOKENS, 120.0)
            scores, queries, positions = [], [], []
            for ids, _, _ in gen.info["rows"]:  # each row teacher-forced alone: its scores over everything it sees
                full = [kv.clone() for kv in self.cache]
                _, sq = model.forward(list(ids), full, self.T, return_queries=True)
                pos = torch.arange(self.T, self.T + len(ids))
                scores.append([reconstruction_scores(group_queries(q, H, pos)[0], kv.keys, pos.repeat(model.num_heads // H),
                                                     self.T, model.scale) for q, kv in zip(sq, full)])
                queries.append(sq)
                positions.append(pos)
            layers = range(model.num_layers)
            self.study = [torch.stack([row[layer] for row in scores]).amax(0) for layer in layers]
            self.queries["self_study"] = [group_queries(torch.cat([sq[layer] for sq in queries]), H, torch.cat(positions))
                                          for layer in layers]
            self.study_s = time.perf_counter() - t0
        self.questions = [tok(q.text, add_special_tokens=False)["input_ids"] for q in task.questions]
        self.words = word_ids([tok.decode([i]) for i in self.ids])

    def compacted(self, cell: Cell, ratio: float) -> tuple[list[LayerKV], float]:
        t = budget(self.T, ratio=ratio)
        out, secs = [], 0.0
        kpos = torch.arange(self.T)
        check = None
        if cell.scores and cell.scores.startswith("check"):
            t0 = time.perf_counter()
            check = self.reconstruction_misses(ratio, t, cell.options.get("check_share", 0.5),
                                               cell.options.get("check_width", 1))
            secs += time.perf_counter() - t0
        for layer, kv in enumerate(self.cache):
            q, qpos = self.queries[cell.source][layer]
            opts = {k: v for k, v in cell.options.items() if not k.startswith("check_")}
            if check is not None:
                opts["key_scores"] = self.kvzip[layer] + check
            elif cell.scores:
                opts["key_scores"] = self.key_scores(cell.scores, layer)
            t0 = time.perf_counter()
            r = compact(kv.keys, kv.values, q, t, cell.method, query_positions=qpos, key_positions=kpos, **opts)
            secs += time.perf_counter() - t0
            out.append(LayerKV(r.keys.float(), r.values.float(), r.beta.float()))
        return out, secs

    def key_scores(self, kind: str, layer: int) -> torch.Tensor:
        """``kvzip``: reconstruction score; ``surprisal``: first-read surprisal (the same for every head);
        ``kvzip_surprisal``: their product (copied *and* unpredictable: what only the cache can supply);
        ``kvzip_layer`` / ``kvzip_global_*``: one KVzip-based score shared by a layer's heads / by everything."""
        H = self.model.num_kv_heads
        s = self.surprisal.expand(H, -1)
        if kind == "kvzip":
            return self.kvzip[layer]
        if kind == "surprisal":
            return s
        if kind == "study":
            return self.study[layer]
        if kind == "kvzip_study":
            return torch.maximum(self.kvzip[layer], self.study[layer])
        if kind == "kvzip_surprisal":
            return self.kvzip[layer] * (1.0 + s)
        if kind == "kvzip_words":  # a word (a number's digits, a name's pieces) kept whole or not at all
            return word_max(self.kvzip[layer], self.words)
        if kind == "kvzip_layer":  # one selection for every head of a layer: its heads' largest score
            return self.kvzip[layer].amax(0, keepdim=True).expand(H, -1)
        if kind in ("kvzip_global_mean", "kvzip_global_rank", "kvzip_global_max"):
            return self.global_scores(kind).expand(H, -1)
        raise ValueError(f"unknown key score {kind!r}")

    def reconstruction_misses(self, ratio: float, t: int, share: float, width: int) -> torch.Tensor:
        """``(T,)`` bonus for the tokens a KVzip-compacted cache fails to reproduce when the document is
        re-read over it: the top ``share`` of the budget by re-read loss, kept in every layer and head."""
        first, _ = self.compacted(CELLS["kvzip"], ratio)
        prompt = self.tok(REPEAT_PROMPT, add_special_tokens=False)["input_ids"]
        logits = self.model.forward(prompt + self.ids, first, self.T)
        P = len(prompt)
        logp = torch.log_softmax(logits[P - 1:P - 1 + self.T].float(), -1)
        nll = -logp.gather(1, torch.tensor(self.ids)[:, None]).squeeze(1)
        m = max(1, int(share * t))
        bonus = torch.zeros(self.T)
        for p in torch.topk(nll, min(m, self.T)).indices.tolist():
            bonus[max(0, p - width + 1):p + 1] = 1e3
        self.check_nll = nll
        return bonus

    def global_scores(self, kind: str) -> torch.Tensor:
        """``(T,)`` one score for every layer and head, so a token is kept everywhere or nowhere."""
        every = torch.stack(self.kvzip)  # (layers, H, T)
        if kind == "kvzip_global_max":
            return every.amax((0, 1))
        if kind == "kvzip_global_rank":  # each head's ranks, so no head's scale decides alone
            every = every.argsort(-1).argsort(-1).float() / every.shape[-1]
        return every.mean((0, 1))

    def answer(self, cache: list[LayerKV], tok) -> list[str]:
        """Greedy answers to every question, batched over one copy of ``cache``."""
        qs = self.task.questions
        B, P = len(qs), max(len(ids) for ids in self.questions)
        new = max(q.max_new_tokens for q in qs)
        batch = PrefixBatch(self.model, cache, B, P + new)
        tokens = torch.zeros(B, P, dtype=torch.long)
        valid = torch.zeros(B, P, dtype=torch.bool)
        positions = torch.zeros(B, P, dtype=torch.long)
        for b, ids in enumerate(self.questions):
            pad = P - len(ids)
            tokens[b, pad:] = torch.tensor(ids)
            valid[b, pad:] = True
            positions[b] = (torch.arange(P) - pad).clamp_min(0) + self.T
        logits, _ = batch.step(tokens, positions, valid, want_queries=False)
        nxt = torch.tensor([self.T + len(ids) for ids in self.questions])
        answers = []
        for i in range(new):
            token = logits.argmax(-1)
            answers.append(token)
            if i < new - 1:
                logits, _ = batch.step(token[:, None], (nxt + i)[:, None], want_queries=False)
        gen = torch.stack(answers, 1)
        return [tok.decode(gen[b, :q.max_new_tokens].tolist(), skip_special_tokens=True) for b, q in enumerate(qs)]


def run(args, model, tok) -> list[dict]:
    cells = {name: CELLS[name] for name in args.cells}
    for spec in args.variants or []:
        for name, c in json.loads(spec).items():
            cells[name] = Cell(c["method"], c.get("source", "context"), c.get("options", {}), c.get("scores"))
    need_repeat = any(c is not None and (c.source == "repeat" or "kvzip" in (c.scores or "")) for c in cells.values())
    need_study = any(c is not None and (c.source == "self_study" or "study" in (c.scores or "")) for c in cells.values())
    rows = []
    jobs = [(fmt, L, tk) for L in args.tokens for fmt in args.formats
            for tk in tasks.tasks(args.set, fmt, tok, L, args.trials, args.seed)]
    for fmt, L, task in tqdm(jobs, desc="documents"):
        doc = Document(model, tok, task, need_repeat, need_study)
        for name, cell in cells.items():
            for ratio in ([1.0] if cell is None else args.ratios):
                if cell is None:
                    cache, secs = [kv.clone() for kv in doc.cache], 0.0
                else:
                    cache, secs = doc.compacted(cell, ratio)
                for q, ans in zip(task.questions, doc.answer(cache, tok)):
                    rows.append({"task": task.id, "set": task.set, "format": fmt, "tokens": L, "T": doc.T,
                                 "cell": name, "ratio": ratio, "score": tasks.score(q, ans), "answer": ans,
                                 "expected": list(q.expected), "compact_s": secs, "prefill_s": doc.prefill_s,
                                 "repeat_s": doc.repeat_s, "study_s": doc.study_s})
    return rows


def summarise(rows: list[dict]) -> dict:
    """{(format, tokens, cell, ratio): {mean, ci, n}} plus an ``all`` format pooling every format."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        for fmt in (r["format"], "all"):
            groups.setdefault((fmt, r["tokens"], r["cell"], r["ratio"]), []).append(r["score"])
    return {k: {"mean": sum(v) / len(v), "ci": sets.bootstrap(v), "n": len(v)} for k, v in groups.items()}


def markdown(rows: list[dict], meta: dict) -> str:
    summ = summarise(rows)
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    ratios = sorted({r["ratio"] for r in rows if r["cell"] != "full"}, reverse=True)
    formats = list(dict.fromkeys(r["format"] for r in rows)) + ["all"]
    lengths = sorted({r["tokens"] for r in rows})
    set_name = rows[0]["set"] if rows else "?"
    lines = [f"# Task accuracy after compaction, {set_name.upper()} tasks ({meta['utc']})", "",
             f"Command: `{meta['command']}`  ", describe(meta), "",
             "Document compacted without the question, then each question answered greedily over the compacted "
             "cache (offline reference forward). Cell: accuracy % [90 % bootstrap interval over questions] "
             "(retention = accuracy / full-context accuracy). n = questions per cell.", ""]
    for L in lengths:
        for fmt in formats:
            full = summ.get((fmt, L, "full", 1.0))
            if not any(k[0] == fmt and k[1] == L for k in summ):
                continue
            head = f"## {fmt}, {L}-token documents"
            if full:
                head += f" — full context {100 * full['mean']:.0f} % [{100 * full['ci'][0]:.0f}–{100 * full['ci'][1]:.0f}], n = {full['n']}"
            lines += [head, "", "| cell | " + " | ".join(f"r = {x}" for x in ratios) + " |",
                      "|---|" + "---|" * len(ratios)]
            for c in cells:
                if c == "full":
                    continue
                out = []
                for x in ratios:
                    s = summ.get((fmt, L, c, x))
                    if s is None:
                        out.append("–")
                        continue
                    ret = f" ({100 * s['mean'] / full['mean']:.0f} %)" if full and full["mean"] > 0 else ""
                    out.append(f"{100 * s['mean']:.0f} [{100 * s['ci'][0]:.0f}–{100 * s['ci'][1]:.0f}]{ret}")
                lines.append(f"| {c} | " + " | ".join(out) + " |")
            lines.append("")
    cost = {}
    for r in rows:
        if r["cell"] != "full":
            cost.setdefault((r["cell"], r["ratio"], r["task"]), (r["compact_s"], r["prefill_s"], r["repeat_s"]))
    lines += ["## Cost (seconds per document, mean; offline torch forward, 2 CPU cores)", "",
              "| cell | ratio | compaction of all layers | prefill | repeat prefill + KVzip scores |", "|---|---|---|---|---|"]
    for c in cells:
        for x in ratios:
            v = [val for k, val in cost.items() if k[0] == c and k[1] == x]
            if v:
                lines.append(f"| {c} | {x} | {sum(a for a, _, _ in v) / len(v):.2f} | {sum(b for _, b, _ in v) / len(v):.2f} | "
                             f"{sum(d for _, _, d in v) / len(v):.2f} |")
    variants = {c: CELLS.get(c) for c in cells}
    lines += ["", "## Cells", ""] + [f"- `{c}`: " + (json.dumps({"method": v.method, "source": v.source, "options": v.options,
                                                               "scores": v.scores}) if v else "full context")
                                     for c, v in variants.items() if c in CELLS] + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks recall", description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=("dev", "test"), default="dev")
    ap.add_argument("--formats", nargs="+", default=list(tasks.FORMATS), choices=tasks.FORMATS)
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024])
    ap.add_argument("--trials", type=int, default=8, help="documents per format and length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.1, 0.05])
    ap.add_argument("--cells", nargs="+", default=["full", "default", "kvzip", "snapkv", "h2o"],
                    choices=list(CELLS))
    ap.add_argument("--variants", nargs="*", help='JSON {"name": {"method", "source", "options", "scores"}}')
    ap.add_argument("--model", default=None, help="HF folder of a Llama-style model (default: the bundled one)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default (as the offline study): two spinning threads per job ran "
                         "~5x slower on a shared 2-core machine")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vllm_attnmatch.model import ensure_model

    folder = args.model or str(ensure_model())
    model = ReferenceLlama.from_pretrained(folder)
    tok = texts.tokenizer(folder)
    meta = stamp(argv)
    rows = run(args, model, tok)
    result = {"meta": meta, "rows": rows}
    md = markdown(rows, meta)
    output.write(result, f"recall_{args.tag or args.set}", md)
    print(md)
