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

Texts: the corpus of ``benchmarks/common/corpus.py`` (``dev`` and ``test`` by default). The report gives TEST-set
means with their spread over texts and the DEV numbers beside them (``benchmarks/common/sets.py``). Presets
(``presets``): each bundled preset is served by its own server (started one after another) and scored
with a request that only sets ``am_ratio`` — what a user of that preset gets — labelled ``preset:<name>``.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, field_validator

from ..common import corpus, output, plots, scoring, sets, texts
from ..common.serving import PLUGIN, Endpoint, ServerSpec, delta

NAME = "fidelity"
AM_METHODS = ("highest_attention", "omp")
EVICTION = ("snapkv", "h2o", "tova", "streaming", "truncate", "random")
PRESETS = ("default", "fast", "quality", "paper")
TEXT_METHODS = ("summary", "summary_am")
METHODS = AM_METHODS + EVICTION + TEXT_METHODS
SUMMARY_PROMPT = "{doc}\n\nSummarize the text above in at most {words} words. Keep its key terms."
MIN_SPAN_TOKENS = 32  # the default preset's min_prompt_tokens: shorter spans are not compacted


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[str] = list(corpus.DEV + corpus.TEST)
    ratios: list[float] = [0.2, 0.1, 0.05, 0.02]
    methods: list[str] = list(METHODS)
    presets: list[str] = list(PRESETS)
    doc_tokens: int = 1024
    cont_tokens: int = 256
    top: int = 20
    keep_first: int = 4
    summary_factor: float = 2.0

    @field_validator("texts")
    @classmethod
    def _texts(cls, v):
        names = texts.expand(v)
        if not names:
            raise ValueError("give at least one text (a corpus name, dev, test, all, a licence name or a path)")
        return names

    @field_validator("presets")
    @classmethod
    def _presets(cls, v):
        from vllm_attnmatch.config import ConfigError, load_preset

        for name in v:
            try:
                load_preset(name)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return v

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


#: one DEV and one TEST text, so the quick report shows both sets; no preset servers
QUICK = {"texts": ["bash-INTRO", "coreutils-README"], "ratios": [0.1], "presets": [],
         "methods": ["highest_attention", "snapkv", "summary"], "doc_tokens": 256, "cont_tokens": 64}
#: shared with the speed suite (8k contexts), so ``--suite all`` starts one server for both
SPEC = ServerSpec("main", max_model_len=8192)


def spec(cfg: Config) -> ServerSpec:
    return SPEC


def preset_spec(name: str) -> ServerSpec:
    """A server like :data:`SPEC` started with the preset ``name`` instead of ``default``."""
    if name == PLUGIN["attnmatch"]["preset"]:
        return SPEC
    return ServerSpec(f"preset-{name}", json.dumps({"attnmatch": {"preset": name}}), max_model_len=SPEC.max_model_len)


def kept_entries(tokens: int, ratio: float | None, keep_first: int, block: int, target: int | None = None) -> int:
    """KV entries a compaction of ``tokens`` leaves (sinks + budget + raw tail after the last block boundary),
    as the engine plans it (``engine.layouts.plan_layout``), padding excluded."""
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

    def compacted(self, method: str | None, ratio: float) -> dict:
        """``method`` None: the server's own (preset) method."""
        xargs = {"am_ratio": ratio, "am_keep_first": self.cfg.keep_first, "am_keep_last": len(self.cont)}
        if method is not None:
            xargs["am_method"] = method
        return {**self._score(self.doc, xargs, f"{method or 'preset'}-{ratio}"), "kept": self.budget(ratio)}

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
        if method.startswith("preset:"):
            data = self.compacted(None, ratio)
        elif method == "summary":
            data = self.summarised(ratio)
        elif method == "summary_am":
            data = self.summarised_then_compacted(ratio)
        else:
            data = self.compacted(method, ratio)
        self.done[(method, ratio)] = data
        return {"text": self.name, "set": sets.set_name(self.name), "method": method, "ratio": ratio,
                "budget": self.budget(ratio), **data}


def run(cfg: Config, endpoint: Endpoint, run_id: str, progress, servers=None) -> dict:
    """Every (text, method, ratio) cell, then every (preset, text, ratio) cell on that preset's server
    (``servers``: a ``serving.Servers``; without one, e.g. with ``--url``, presets are skipped and said
    so); ``progress`` is a tqdm bar advanced once per cell."""
    tok = texts.tokenizer()
    block = endpoint.block_size()
    cells, full, skipped = [], {}, []

    def pass_over(ep: Endpoint, methods: list[str], tag: str) -> None:
        for name in cfg.texts:
            progress.set_postfix_str(f"{tag}{name} full context")
            text = _Cells(cfg, ep, tok, name, run_id + tag, block)
            full.setdefault(name, {"doc_tokens": len(text.doc), "cont_tokens": len(text.cont),
                                   "request_s": text.full_s})
            for method in methods:
                for ratio in cfg.ratios:
                    progress.set_postfix_str(f"{name} {method} r={ratio}")
                    cells.append(text.cell(method, ratio))
                    progress.update()

    pass_over(endpoint, cfg.methods, "")
    for preset in cfg.presets:
        if servers is None or getattr(servers, "url", None):
            skipped.append(preset)
            progress.update(len(cfg.texts) * len(cfg.ratios))
            continue
        pass_over(servers.get(preset_spec(preset)), [f"preset:{preset}"], f"-{preset}")
    return {"block_size": block, "full_context": full, "cells": cells, "presets_skipped": skipped}


def steps(cfg: Config) -> int:
    return len(cfg.texts) * (len(cfg.methods) + len(cfg.presets)) * len(cfg.ratios)


def mean_cell(cells: list[dict], method: str, ratio: float, key: str) -> float | None:
    return output.mean(c.get(key) for c in cells if c["method"] == method and c["ratio"] == ratio)


def _methods(result: dict) -> list[str]:
    """Methods in the order the config lists them, then the preset cells."""
    cells = result["cells"]
    listed = list(result["config"]["methods"]) + [f"preset:{p}" for p in result["config"].get("presets", [])]
    return [m for m in listed if any(c["method"] == m for c in cells)]


def grid(result: dict, key: str, spec: str) -> list[str]:
    cfg, cells = result["config"], result["cells"]
    methods = _methods(result)
    rows = [[m] + [output.fmt(mean_cell(cells, m, r, key), spec) for r in cfg["ratios"]] for m in methods]
    return output.table(["method"] + [f"r={r:g}" for r in cfg["ratios"]], rows)


def markdown(result: dict) -> str:
    from ..common import answers
    from ..common.stamp import describe

    cfg = result["config"]
    lines = [
        f"# Fidelity vs kept ratio{' (quick smoke run)' if result.get('quick') else ''}", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        (f"Texts {', '.join(cfg['texts'])}: document {cfg['doc_tokens']} tokens, continuation {cfg['cont_tokens']} "
        f"scored after it (mean over texts). KV block {result['block_size']} tokens; {cfg['keep_first']} sink tokens "
        "stay raw. Lower is better except agreement."), "",
        *answers.fidelity_lines(answers.fidelity(result)), "",
        f"## KL@{cfg['top']}(full ‖ reduced) per token, by corpus set",
        *sets.lines(result["cells"], "kl", ".4f", f"KL@{cfg['top']}", _methods(result)),
        "## ΔNLL of the continuation (% of full-context NLL), by corpus set",
        *sets.lines(result["cells"], "delta_nll_pct", "+.2f", "ΔNLL %", _methods(result)),
        "## Teacher-forced top-1 agreement with full context (all texts)", *grid(result, "top1_agreement", ".3f"), "",
        "## Kept KV entries of the document (sinks + budget + raw tail; padding excluded)", *grid(result, "kept", ".0f"), "",
        "## Compaction seconds (worker side, all layers)", *grid(result, "compaction_s", ".2f"), "",
    ]
    if any(c["method"] in TEXT_METHODS for c in result["cells"]):
        lines += ["## Summaries", *output.table(
            ["text", "method", "ratio", "mode", "summary tokens", "kept", "generation s"],
            [[c["text"], c["method"], c["ratio"], c.get("mode", ""), c.get("summary_tokens"), c.get("kept"),
              output.fmt(c.get("summary_s"), ".1f")] for c in result["cells"] if c["method"] in TEXT_METHODS]), ""]
    if result.get("presets_skipped"):
        lines += [f"Presets not run (a server given by --url serves one configuration): "
                  f"{', '.join(result['presets_skipped'])}.", ""]
    full = result["full_context"]
    lines.append("Full-context request (prefill + 1 token): " + ", ".join(
        f"{name} {v['request_s']:.2f} s" for name, v in full.items()) + ".")
    return "\n".join(lines)


plot = plots.fidelity
