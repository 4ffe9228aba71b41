"""Speed suite: what compaction costs next to prefill, and what it does to the decode step, per context length.

For each context length L (real text), on one server:
- a stock request (no ``am_*`` keys): its time to first token is the prefill time (client side; vLLM's
  own ``vllm:request_prefill_time_seconds`` is recorded next to it), and the mean time between streamed
  tokens after the first is the decode step time at a KV length of about L;
- per compaction method, the same prompt with ``am_ratio``: compaction seconds come from the plugin's
  ``vllm_attnmatch_compaction_seconds_total`` counter, the decode step time is measured the same way, now
  at a KV length of about ratio·L (plus the raw tail and block padding; ``kv_entries`` records it).

Every request carries a fresh ``cache_salt``, so nothing is served from the prefix cache. One warm-up
request of each kind runs first. With ``repeats`` > 1 each number is the minimum over the repeats.
"""

from __future__ import annotations

import statistics
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from ..common import output, plots, texts
from .fidelity import SPEC, preset_spec
from ..common.serving import Endpoint, ServerSpec, delta

NAME = "speed"
MAX_MODEL_LEN = SPEC.max_model_len


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lengths: list[int] = [1024, 2048, 4096, 8064]
    methods: list[str] = ["highest_attention"]
    # Serve this bundled preset instead (as `--attnmatch <preset>`): compacted requests then send only
    # am_ratio, so the preset's own method, queries and algorithm options are what gets timed.
    preset: str | None = None
    ratio: float = 0.1
    queries: Literal["context", "repeat", "self_study"] = "context"  # am_queries of the compacted requests
    decode_tokens: int = 64
    keep_last: int = 16
    repeats: int = 3

    @field_validator("lengths")
    @classmethod
    def _lengths(cls, v):
        return sorted(v)

    @model_validator(mode="after")
    def _fits(self):
        if max(self.lengths) + self.decode_tokens > MAX_MODEL_LEN:
            raise ValueError(f"longest length + decode tokens must be ≤ {MAX_MODEL_LEN} (the model's context)")
        if not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        return self


QUICK = {"lengths": [256, 512], "decode_tokens": 8, "repeats": 1}


def spec(cfg: Config) -> ServerSpec:
    return preset_spec(cfg.preset) if cfg.preset else SPEC


def _cases(cfg: Config) -> dict[str, dict]:
    """Compacted request kinds: label → the am_* keys they send (besides am_ratio)."""
    if cfg.preset:
        return {f"preset {cfg.preset}": {}}
    return {m: {"am_method": m, "am_keep_last": cfg.keep_last, "am_queries": cfg.queries} for m in cfg.methods}


def steps(cfg: Config) -> int:
    return len(cfg.lengths) * (1 + len(_cases(cfg))) * cfg.repeats


def _timed(endpoint: Endpoint, prompt: list[int], cfg: Config, xargs: dict | None, salt: str) -> dict:
    before = endpoint.metrics()
    stream = endpoint.stream(prompt, cfg.decode_tokens, xargs, salt)
    after = endpoint.metrics()
    report = endpoint.report(stream.id) if xargs and stream.id else None
    components = ((report or {}).get("data") or [{}])[0].get("seconds_by_component") or {}
    return {
        "components_s": components,
        "ttft_s": stream.ttft_s,
        "tpot_s": stream.tpot_s,
        "output_tokens": stream.tokens,
        "vllm_prefill_s": delta(before, after, "vllm:request_prefill_time_seconds_sum"),
        "compaction_s": delta(before, after, "vllm_attnmatch_compaction_seconds_total"),
        "compactions": delta(before, after, "vllm_attnmatch_compactions_total"),
        "tokens_after": delta(before, after, "vllm_attnmatch_tokens_after_total"),
    }


def _best(samples: list[dict]) -> dict:
    """Minimum of every timing over the repeats (the least disturbed run); counts from the first."""
    out = dict(samples[0])
    for key in ("ttft_s", "tpot_s", "vllm_prefill_s", "compaction_s"):
        values = [s[key] for s in samples if s.get(key) is not None]
        out[key] = min(values) if values else None
    if samples[0].get("compaction_s") is not None:  # the components of the fastest compaction
        fastest = min(samples, key=lambda s: s.get("compaction_s") or float("inf"))
        out["components_s"] = fastest.get("components_s") or {}
    if len(samples) > 1:
        out["ttft_spread_s"] = statistics.pstdev(s["ttft_s"] for s in samples)
    return out


def run(cfg: Config, endpoint: Endpoint, run_id: str, progress) -> dict:
    tok = texts.tokenizer()
    block = endpoint.block_size()
    warm = texts.long_ids(tok, 300)
    progress.set_postfix_str("warm-up")
    endpoint.stream(warm, 4, None, f"{run_id}-warm-stock")
    cases = _cases(cfg)
    for m, keys in cases.items():
        endpoint.stream(warm, 4, {"am_ratio": cfg.ratio, **keys}, f"{run_id}-warm-{m}")
    rows = []
    for length in cfg.lengths:
        prompt = texts.long_ids(tok, length)
        samples: dict[str, list[dict]] = {"stock": [], **{m: [] for m in cases}}
        for rep in range(cfg.repeats):
            progress.set_postfix_str(f"L={length} stock")
            samples["stock"].append(_timed(endpoint, prompt, cfg, None, f"{run_id}-{length}-stock-{rep}"))
            progress.update()
            for m, keys in cases.items():
                progress.set_postfix_str(f"L={length} {m}")
                xargs = {"am_ratio": cfg.ratio, **keys}
                samples[m].append(_timed(endpoint, prompt, cfg, xargs, f"{run_id}-{length}-{m}-{rep}"))
                progress.update()
        stock = _best(samples["stock"])
        stock["prefill_s"] = stock["ttft_s"]
        stock["kv_entries"] = length
        compacted = {}
        for m in cases:
            c = _best(samples[m])
            span_end = (length - max(cfg.keep_last, 1)) // block * block  # as engine.layouts.plan_layout
            c["kv_entries"] = c["tokens_after"] + length - span_end if c["compactions"] else None
            c["compaction_share"] = c["compaction_s"] / stock["prefill_s"] if stock["prefill_s"] else None
            compacted[m] = c
        rows.append({"tokens": length, "stock": stock, "compacted": compacted})
    return {"block_size": block, "rows": rows}


def markdown(result: dict) -> str:
    from ..common import answers
    from ..common.stamp import describe

    cfg = result["config"]
    ms = lambda v: output.fmt(v * 1e3 if v is not None else None, ".1f")
    body = []
    for row in result["rows"]:
        s = row["stock"]
        for m, c in row["compacted"].items():
            body.append([row["tokens"], output.fmt(s["prefill_s"], ".2f"), output.fmt(s["vllm_prefill_s"], ".2f"), m,
                         output.fmt(c["compaction_s"], ".2f"), output.fmt(100 * c["compaction_share"], ".0f") + " %",
                         output.fmt(c["kv_entries"], ".0f"), output.fmt(c["ttft_s"], ".2f"), ms(s["tpot_s"]), ms(c["tpot_s"])])
    lines = [
        f"# Compaction time vs prefill, decode step vs KV length{' (quick smoke run)' if result.get('quick') else ''}", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        (f"Ratio {cfg['ratio']}, {cfg.get('queries', 'context')} reference queries, {cfg['decode_tokens']} greedy "
         f"output tokens per request, best of {cfg['repeats']}. "
        "Prefill = stock time to first token (client side); vLLM prefill = vLLM's own prefill-time metric. "
        "KV entries = the compacted request's physical KV entries when decoding starts (compacted prefix, "
        f"padded to whole {result['block_size']}-token blocks, plus the raw end of the prompt)."), "",
        *answers.speed_lines(answers.speed(result)), "",
        *output.table(["context tokens", "prefill s", "vLLM prefill s", "method", "compaction s", "of prefill",
                       "KV entries after", "compacted TTFT s", "stock ms/token", "compacted ms/token"], body),
        *component_lines(result),
    ]
    return "\n".join(lines)


COMPONENT_ORDER = ("gather", "queries", "scoring", "beta", "values", "gate", "prepare", "write", "reference_queries")


def component_lines(result: dict) -> list[str]:
    """Where the served compaction's seconds went (the per-request report's ``seconds_by_component``)."""
    names: list[str] = []
    body = []
    for row in result["rows"]:
        for m, c in row["compacted"].items():
            comp = c.get("components_s") or {}
            names += [n for n in comp if n not in names]
            body.append((row["tokens"], m, c.get("compaction_s"), comp))
    if not names:
        return []
    order = [n for n in COMPONENT_ORDER if n in names] + [n for n in names if n not in COMPONENT_ORDER]
    rows = [[tokens, m, output.fmt(total, ".2f"), *[output.fmt(comp.get(n), ".2f") for n in order]]
            for tokens, m, total, comp in body]
    return ["", "Served compaction seconds by component (all layers; from the per-request report of the fastest "
            "repeat): gather = reading the paged source blocks, queries/scoring/beta/values/gate = the algorithm, "
            "prepare = the executor's work around it, write = the new layout into the destination blocks.", "",
            *output.table(["context tokens", "method", "compaction s", *[f"{n} s" for n in order]], rows)]


plot = plots.speed
