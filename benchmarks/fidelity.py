"""Fidelity suite: what a continuation loses when its document is compacted (or summarised) to a budget.

A real text is split into a document D (``doc_tokens``, a whole number of KV blocks) and a continuation
C. The full-context reference is one request for ``D + C`` with prompt logprobs. Every other cell keeps
about ``budget = keep_first + ratio·(|D| − keep_first)`` KV entries of D and scores C after them through
the same server:

- compaction methods (AM ``highest_attention`` / ``omp`` and the eviction baselines): the same prompt with
  ``am_ratio``, ``am_method``, ``am_keep_last = |C|`` — the engine compacts D after its prefill and
  prefills C over the compacted cache, so C's prompt logprobs are scored after compaction;
- ``summary``: the model summarises D (chat prompt, greedy, at most ``budget`` tokens); C is scored after
  the summary instead of D;
- ``summary_am``: summarise to ``summary_factor × budget`` tokens, then AM-compact the summary to the
  budget (``am_target_tokens``, highest-attention). Choices, recorded per cell as ``mode``: when
  ``summary_factor × budget ≥ |D|`` the document itself is AM-compacted (``document``: the same as the
  highest-attention cell); a summary already within budget is used as is (``fits``); the compacted span
  ends on a KV-block boundary, so the raw tail of the summary after the last boundary counts against the
  budget (``am``); a summary too short to hold one compactable block is cut to the budget (``cut``).

Per cell: ΔNLL of C (% of the full-context NLL), KL@k(full ‖ reduced) per token, teacher-forced top-1
agreement, kept KV entries, compaction seconds (worker side, from ``/metrics``) or summary seconds.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, field_validator

from . import output, plots, scoring, texts
from .serving import Endpoint, ServerSpec, delta

NAME = "fidelity"
AM_METHODS = ("highest_attention", "omp")
EVICTION = ("snapkv", "h2o", "streaming", "truncate", "random")
TEXT_METHODS = ("summary", "summary_am")
METHODS = AM_METHODS + EVICTION + TEXT_METHODS
SUMMARY_PROMPT = "{doc}\n\nSummarize the text above in at most {words} words. Keep its key terms."
MIN_SPAN_TOKENS = 32  # the default preset's min_prompt_tokens: shorter spans are not compacted


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = list(texts.DEFAULT_TEXTS)
    ratios: list[float] = [0.5, 0.2, 0.1, 0.05, 0.02]
    methods: list[str] = list(METHODS)
    doc_tokens: int = 1024
    cont_tokens: int = 256
    top: int = 20
    keep_first: int = 4
    summary_factor: float = 2.0

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, v):
        if not v or any(not 0 < r <= 1 for r in v):
            raise ValueError("ratios must be in (0, 1]")
        return sorted(v, reverse=True)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v):
        unknown = set(v) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
        return v


QUICK = {"texts": ["GPL-3"], "ratios": [0.5, 0.1], "methods": ["highest_attention", "snapkv", "summary"],
         "doc_tokens": 256, "cont_tokens": 64}
#: shared with the speed suite (8k contexts), so ``--suite all`` starts one server for both
SPEC = ServerSpec("main", max_model_len=8192)


def spec(cfg: Config) -> ServerSpec:
    return SPEC


def kept_entries(tokens: int, ratio: float | None, keep_first: int, block: int, target: int | None = None) -> int:
    """KV entries a compaction of ``tokens`` leaves (sinks + budget + raw tail after the last block boundary),
    as the engine plans it (``engine.jobs.plan_layout``), padding excluded."""
    span_end = tokens // block * block
    span = span_end - keep_first
    kept = max(1, min(span, int(ratio * span))) if target is None else max(1, min(span, target))
    return keep_first + kept + (tokens - span_end)


class _Cells:
    """The requests of one text: the full reference, compacted cells, summaries (cached by length)."""

    def __init__(self, cfg: Config, endpoint: Endpoint, tok, name: str, run_id: str, block: int):
        self.cfg, self.endpoint, self.tok, self.name, self.run_id, self.block = cfg, endpoint, tok, name, run_id, block
        self.doc, self.cont = texts.split(texts.token_ids(tok, name), cfg.doc_tokens, cfg.cont_tokens, name)
        self.full, self.full_s = endpoint.prompt_logprobs(self.doc + self.cont, None, cfg.top, f"{run_id}-{name}-full")
        self._summaries: dict[int, tuple[list[int], float]] = {}
        self.done: dict[tuple[str, float], dict] = {}

    def budget(self, ratio: float) -> int:
        return kept_entries(len(self.doc), ratio, self.cfg.keep_first, self.block)

    def _score(self, context: list[int], xargs: dict | None, salt: str) -> dict:
        before = self.endpoint.metrics()
        rows, seconds = self.endpoint.prompt_logprobs(context + self.cont, xargs, self.cfg.top, f"{self.run_id}-{salt}")
        after = self.endpoint.metrics()
        return {
            **scoring.score(self.full, rows, self.cont, len(self.doc), len(context), self.cfg.top),
            "compactions": delta(before, after, "vllm_attnmatch_compactions_total"),
            "compaction_s": delta(before, after, "vllm_attnmatch_compaction_seconds_total"),
            "request_s": seconds,
            "full_request_s": self.full_s,
        }

    def summary(self, max_tokens: int) -> tuple[list[int], float]:
        if max_tokens not in self._summaries:
            prompt = SUMMARY_PROMPT.format(doc=self.tok.decode(self.doc), words=max(5, int(0.7 * max_tokens)))
            text, seconds = self.endpoint.chat(prompt, max_tokens)
            ids = self.tok(text.strip(), add_special_tokens=False)["input_ids"][:max_tokens]
            self._summaries[max_tokens] = (ids or self.tok("\n", add_special_tokens=False)["input_ids"], seconds)
        return self._summaries[max_tokens]

    def compacted(self, method: str, ratio: float) -> dict:
        xargs = {"am_ratio": ratio, "am_method": method, "am_keep_first": self.cfg.keep_first,
                 "am_keep_last": len(self.cont)}
        return {**self._score(self.doc, xargs, f"{method}-{ratio}"), "kept": self.budget(ratio)}

    def summarised(self, ratio: float) -> dict:
        ids, seconds = self.summary(self.budget(ratio))
        return {**self._score(ids, None, f"summary-{ratio}"), "kept": len(ids), "summary_tokens": len(ids),
                "summary_s": seconds, "mode": "summary"}

    def summarised_then_compacted(self, ratio: float) -> dict:
        budget, cfg = self.budget(ratio), self.cfg
        longer = int(cfg.summary_factor * budget)
        if longer >= len(self.doc):
            cell = self.done.get(("highest_attention", ratio)) or self.compacted("highest_attention", ratio)
            return {**cell, "mode": "document", "summary_tokens": len(self.doc), "summary_s": 0.0}
        ids, seconds = self.summary(longer)
        extra = {"summary_tokens": len(ids), "summary_s": seconds}
        if len(ids) <= budget:
            return {**self._score(ids, None, f"summary-am-{ratio}"), **extra, "kept": len(ids), "mode": "fits"}
        span_end = len(ids) // self.block * self.block
        target = budget - cfg.keep_first - (len(ids) - span_end)
        if span_end - cfg.keep_first >= MIN_SPAN_TOKENS and target >= 1:
            xargs = {"am_target_tokens": target, "am_method": "highest_attention", "am_keep_first": cfg.keep_first,
                     "am_keep_last": len(self.cont)}
            kept = kept_entries(len(ids), None, cfg.keep_first, self.block, target)
            return {**self._score(ids, xargs, f"summary-am-{ratio}"), **extra, "kept": kept, "mode": "am"}
        ids = ids[:budget]
        return {**self._score(ids, None, f"summary-cut-{ratio}"), **extra, "kept": len(ids), "mode": "cut"}

    def cell(self, method: str, ratio: float) -> dict:
        if method == "summary":
            data = self.summarised(ratio)
        elif method == "summary_am":
            data = self.summarised_then_compacted(ratio)
        else:
            data = self.compacted(method, ratio)
        self.done[(method, ratio)] = data
        return {"text": self.name, "method": method, "ratio": ratio, "budget": self.budget(ratio), **data}


def run(cfg: Config, endpoint: Endpoint, run_id: str, progress) -> dict:
    """Every (text, method, ratio) cell; ``progress`` is a tqdm bar advanced once per cell."""
    tok = texts.tokenizer()
    block = endpoint.block_size()
    cells, full = [], {}
    for name in cfg.texts:
        progress.set_postfix_str(f"{name} full context")
        text = _Cells(cfg, endpoint, tok, name, run_id, block)
        full[name] = {"doc_tokens": len(text.doc), "cont_tokens": len(text.cont), "request_s": text.full_s}
        for method in cfg.methods:
            for ratio in cfg.ratios:
                progress.set_postfix_str(f"{name} {method} r={ratio}")
                cells.append(text.cell(method, ratio))
                progress.update()
    return {"block_size": block, "full_context": full, "cells": cells}


def steps(cfg: Config) -> int:
    return len(cfg.texts) * len(cfg.methods) * len(cfg.ratios)


def mean_cell(cells: list[dict], method: str, ratio: float, key: str) -> float | None:
    return output.mean(c.get(key) for c in cells if c["method"] == method and c["ratio"] == ratio)


def grid(result: dict, key: str, spec: str) -> list[str]:
    cfg, cells = result["config"], result["cells"]
    methods = [m for m in cfg["methods"] if any(c["method"] == m for c in cells)]
    rows = [[m] + [output.fmt(mean_cell(cells, m, r, key), spec) for r in cfg["ratios"]] for m in methods]
    return output.table(["method"] + [f"r={r:g}" for r in cfg["ratios"]], rows)


def markdown(result: dict) -> str:
    from . import answers
    from .stamp import describe

    cfg = result["config"]
    lines = [
        f"# Fidelity vs kept ratio{' (quick smoke run)' if result.get('quick') else ''}", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        (f"Texts {', '.join(cfg['texts'])}: document {cfg['doc_tokens']} tokens, continuation {cfg['cont_tokens']} "
        f"scored after it (mean over texts). KV block {result['block_size']} tokens; {cfg['keep_first']} sink tokens "
        "stay raw. Lower is better except agreement."), "",
        *answers.fidelity_lines(answers.fidelity(result)), "",
        "## ΔNLL of the continuation (% of full-context NLL)", *grid(result, "delta_nll_pct", "+.2f"), "",
        f"## KL@{cfg['top']}(full ‖ reduced) per token", *grid(result, "kl", ".4f"), "",
        "## Teacher-forced top-1 agreement with full context", *grid(result, "top1_agreement", ".3f"), "",
        "## Kept KV entries of the document (sinks + budget + raw tail; padding excluded)", *grid(result, "kept", ".0f"), "",
        "## Compaction seconds (worker side, all layers)", *grid(result, "compaction_s", ".2f"), "",
    ]
    if any(c["method"] in TEXT_METHODS for c in result["cells"]):
        lines += ["## Summaries", *output.table(
            ["text", "method", "ratio", "mode", "summary tokens", "kept", "generation s"],
            [[c["text"], c["method"], c["ratio"], c.get("mode", ""), c.get("summary_tokens"), c.get("kept"),
              output.fmt(c.get("summary_s"), ".1f")] for c in result["cells"] if c["method"] in TEXT_METHODS]), ""]
    full = result["full_context"]
    lines.append("Full-context request (prefill + 1 token): " + ", ".join(
        f"{name} {v['request_s']:.2f} s" for name, v in full.items()) + ".")
    return "\n".join(lines)


plot = plots.fidelity
