"""Real workloads at equal memory, against stock vLLM: does compaction make a server short of KV finish sooner?

Two servers with the same small pool (``--num-gpu-blocks-override``), started one after the other: stock
vLLM (prefix caching on, no plugin section) and the plugin (``--attnmatch default`` unless ``--preset``).
The same prompts go to both. Workloads (``WORKLOADS``):

- ``documents`` (a): many documents, several questions each, asked round-robin, one request at a time. The
  documents are TEST retrieval tasks (``benchmarks.common.tasks``, planted facts), so the answers can be scored;
  together they hold more raw KV than the pool, so stock's prefix cache cannot keep them, while a
  compacted document is stored once and reused by its later questions;
- ``concurrent`` (b): many long requests sent at once (real text, greedy continuations);
- ``long_generation`` (c): long generations sent at once that together outgrow the pool; stock preempts
  and recomputes, the plugin holds each request under a KV ceiling (online mode, ``am_max_kv_tokens``);
- (d) a document longer than the pool needs compaction during a chunked prefill, which the plugin does not
  do yet: not run, and said so in the results.

Per workload and mode: wall time, output tokens/s, TTFT and inter-token p50/p99, peak KV blocks, peak
requests running, preemptions, prefix-cache hit tokens, compacted-prefix hits, errors, and how close the
answers are to stock's (full-context) answers, with an eviction baseline at the same budget beside
(SnapKV; the sliding window for online mode). Run on an otherwise idle machine: these are timings.

    python -m benchmarks workload                       # all three, ~15 min on 2 CPU cores
    python -m benchmarks workload --workloads documents --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from ..common import output, tasks, texts
from ..common.serving import (FREE_BLOCKS, KV_USAGE, PLUGIN, Endpoint, Servers, ServerSpec, Stream, Watcher, delta,
                              peak_blocks_held)
from ..common.stamp import describe, stamp

WORKLOADS = ("documents", "concurrent", "long_generation")
RUNNING = "vllm:num_requests_running"


class Config(BaseModel):
    """Sizes of the three workloads; the defaults fit 2 CPU cores in about a quarter of an hour."""

    model_config = ConfigDict(extra="forbid")

    workloads: list[str] = list(WORKLOADS)
    preset: str = "default"
    pool_blocks: int = 40  # × 128 tokens on CPU: fewer than the documents' raw KV, more than one request
    ratio: float = 0.1
    # (a) documents
    documents: int = 6
    doc_tokens: int = 2048  # a multiple of the block size, so every question reuses the same compacted span
    questions: int = 3
    answer_tokens: int = 12
    # (b) concurrent
    concurrent: int = 16
    prompt_tokens: int = 1024
    gen_tokens: int = 64
    # (c) long generation
    generations: int = 8
    generation_prompt_tokens: int = 256
    generation_tokens: int = 640
    kv_ceiling: int = 384  # 8 requests under it hold at most ~32 blocks; uncapped they need 56


QUICK = {"documents": 2, "doc_tokens": 1024, "questions": 2, "concurrent": 4, "prompt_tokens": 512, "gen_tokens": 16,
         "generations": 2, "generation_tokens": 160, "kv_ceiling": 256, "pool_blocks": 16}


@dataclass
class Job:
    prompt: list[int]
    max_tokens: int
    ignore_eos: bool = True
    group: str = ""  # requests of one group share a cache salt (a document and its questions)
    expected: tasks.Question | None = None


def document_jobs(cfg: Config, tok) -> list[Job]:
    """Round-robin questions over TEST retrieval documents of exactly ``doc_tokens`` tokens."""
    docs = []
    for task in tasks.tasks("test", "multi_fact", tok, cfg.doc_tokens + 96, cfg.documents):
        ids = tok(task.document, add_special_tokens=False)["input_ids"][: cfg.doc_tokens]
        kept = tok.decode(ids)
        asked = [q for q in task.questions if all(v in kept for v in q.expected)][: cfg.questions]
        docs.append((f"doc{len(docs)}", ids, asked))  # the group names a cache salt: no '/' allowed
    jobs = []
    for round_ in range(cfg.questions):
        for doc_id, ids, asked in docs:
            if round_ < len(asked):
                q = asked[round_]
                jobs.append(Job(ids + tok(q.text, add_special_tokens=False)["input_ids"], cfg.answer_tokens,
                                ignore_eos=False, group=doc_id, expected=q))
    return jobs


def concurrent_jobs(cfg: Config, tok) -> list[Job]:
    return [Job(texts.long_ids(tok, cfg.prompt_tokens, offset=97 * i), cfg.gen_tokens, group=f"c{i}")
            for i in range(cfg.concurrent)]


def generation_jobs(cfg: Config, tok) -> list[Job]:
    return [Job(texts.long_ids(tok, cfg.generation_prompt_tokens, offset=311 * i), cfg.generation_tokens, group=f"g{i}")
            for i in range(cfg.generations)]


#: workload → (jobs, requests at once (0: all), {mode: per-request keys} on the plugin server)
def plan(cfg: Config) -> dict:
    budget = {"am_ratio": cfg.ratio}
    online = {"am_max_kv_tokens": cfg.kv_ceiling}
    return {
        "documents": (document_jobs, 1, {"compacted": budget, "snapkv": {**budget, "am_method": "snapkv"}}),
        "concurrent": (concurrent_jobs, 0, {"compacted": budget, "snapkv": {**budget, "am_method": "snapkv"}}),
        "long_generation": (generation_jobs, 0, {"compacted": online, "sliding window": {**online, "am_method": "streaming"}}),
    }


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


def run_mode(endpoint: Endpoint, jobs: list[Job], at_once: int, xargs: dict | None, salt: str, total: float) -> dict:
    """Send ``jobs`` (``at_once`` at a time, in order) and measure what the server did meanwhile."""
    before = endpoint.metrics()
    watcher = Watcher(endpoint, (FREE_BLOCKS, RUNNING, KV_USAGE), period_s=0.1)
    errors: list[str] = []

    def one(job: Job) -> Stream | None:
        try:
            return endpoint.stream(job.prompt, job.max_tokens, xargs, f"{salt}-{job.group}", ignore_eos=job.ignore_eos)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            return None

    started = time.perf_counter()
    with ThreadPoolExecutor(at_once or len(jobs)) as pool:
        streams = list(pool.map(one, jobs))
    wall = time.perf_counter() - started
    watcher.stop()
    after = endpoint.metrics()
    done = [s for s in streams if s is not None]
    gaps = [b - a for s in done for a, b in zip(s.token_times, s.token_times[1:])]
    ttfts = [s.ttft_s for s in done]
    tokens = sum(s.tokens for s in done)
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall if wall else None,
        "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
        "itl_p50_ms": 1e3 * _percentile(gaps, 50) if gaps else None,
        "itl_p99_ms": 1e3 * _percentile(gaps, 99) if gaps else None,
        "peak_blocks": peak_blocks_held(watcher, total),
        "peak_running": int(watcher.high[RUNNING] or 0),
        "preemptions": delta(before, after, "vllm:num_preemptions_total"),
        "prefix_hit_tokens": delta(before, after, "vllm:prefix_cache_hits_total"),
        "compacted_prefix_hits": delta(before, after, "vllm_attnmatch_prefix_hits_total"),
        "compactions": delta(before, after, "vllm_attnmatch_compactions_total"),
        "online_compactions": delta(before, after, "vllm_attnmatch_online_compactions_total"),
        "failures": delta(before, after, "vllm_attnmatch_failures_total"),
        "errors": len(errors), "error_samples": errors[:3],
        "answers": [s.text if s is not None else None for s in streams],
    }


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def closeness(row: dict, reference: dict, jobs: list[Job]) -> dict:
    """How close a mode's answers are to stock's full-context answers (and, for tasks, how often right)."""
    pairs = [(a, r) for a, r in zip(row["answers"], reference["answers"]) if a is not None and r is not None]
    scored = [(tasks.score(j.expected, a), tasks.score(j.expected, r))
              for j, a, r in zip(jobs, row["answers"], reference["answers"]) if j.expected and a is not None and r is not None]
    return {
        "same_answer": sum(a == r for a, r in pairs) / len(pairs) if pairs else None,
        "agreement_chars": statistics.mean(_common_prefix(a, r) for a, r in pairs) if pairs else None,
        "accuracy": statistics.mean(s for s, _ in scored) if scored else None,
        "full_accuracy": statistics.mean(f for _, f in scored) if scored else None,
    }


def run(cfg: Config, servers: Servers, progress) -> dict:
    tok = texts.tokenizer()
    chosen = {w: plan(cfg)[w] for w in cfg.workloads}
    jobs = {w: make(cfg, tok) for w, (make, _, _) in chosen.items()}
    args = ("--enforce-eager", "--num-gpu-blocks-override", str(cfg.pool_blocks), "--max-num-batched-tokens", "512",
            "--enable-prefix-caching")
    max_len = (cfg.pool_blocks - 1) * 128
    plugin_config = json.dumps({"attnmatch": {**PLUGIN["attnmatch"], "preset": cfg.preset}})
    stock = ServerSpec(f"workload-stock-{cfg.pool_blocks}", None, args, max_model_len=max_len)
    salt = time.strftime("%H%M%S")
    rows: list[dict] = []
    # Stock first; then each plugin mode on a fresh plugin server, so that the compacted prefixes one mode
    # stored (and how often they were asked, which decides the pins) never help or hinder the next mode.
    runs = [(stock, workload, "stock", None) for workload in chosen]
    for mode in dict.fromkeys(m for _, _, modes in chosen.values() for m in modes):
        spec = ServerSpec(f"workload-plugin-{cfg.pool_blocks}-{mode.replace(' ', '-')}", plugin_config, args,
                          max_model_len=max_len)
        runs += [(spec, workload, mode, modes[mode]) for workload, (_, _, modes) in chosen.items() if mode in modes]
    for spec, workload, mode, xargs in runs:
        endpoint = servers.get(spec)
        total = endpoint.num_blocks() or cfg.pool_blocks
        progress.set_postfix_str(f"{workload}: {mode}")
        row = run_mode(endpoint, jobs[workload], chosen[workload][1], xargs, f"{salt}-{mode}", total)
        rows.append({"workload": workload, "mode": mode, "xargs": xargs, **row})
        progress.update()
    for row in rows:
        reference = next(r for r in rows if r["workload"] == row["workload"] and r["mode"] == "stock")
        row.update(closeness(row, reference, jobs[row["workload"]]))
        row["speedup_vs_stock"] = reference["wall_s"] / row["wall_s"] if row["wall_s"] else None
    return {"pool_blocks": cfg.pool_blocks, "block_size": 128, "requests": {w: len(j) for w, j in jobs.items()},
            "rows": rows}


def _pct(value) -> str:
    return output.fmt(None if value is None else 100 * value, ".0f") + (" %" if value is not None else "")


def markdown(result: dict) -> str:
    cfg = result["config"]
    what = {
        "documents": (f"{cfg['documents']} documents of {cfg['doc_tokens']} tokens (TEST retrieval tasks), "
                      f"{cfg['questions']} questions each, round-robin, one request at a time"),
        "concurrent": f"{cfg['concurrent']} requests of {cfg['prompt_tokens']} tokens at once, {cfg['gen_tokens']} tokens each",
        "long_generation": (f"{cfg['generations']} generations of {cfg['generation_tokens']} tokens after "
                            f"{cfg['generation_prompt_tokens']} prompt tokens, at once; KV ceiling {cfg['kv_ceiling']}"),
    }
    lines = [f"# Workloads at equal memory: stock vLLM vs compaction{' (quick smoke run)' if result.get('quick') else ''}", "",
             f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
             f"Pool {result['pool_blocks']} blocks of {result['block_size']} tokens on both servers; plugin preset "
             f"`{cfg['preset']}`, `am_ratio` {cfg['ratio']}. Agreement = mean characters equal to stock's answer "
             "before the first difference. (d) a document longer than the pool: not run, the plugin does not "
             "compact during a chunked prefill yet.", ""]
    headers = ["mode", "wall s", "× stock", "output tok/s", "TTFT p50 / p99 s", "ITL p50 / p99 ms", "peak blocks",
               "peak running", "preemptions", "prefix-hit tokens", "compactions (online)", "compacted hits", "errors",
               "same answer", "agreement", "accuracy"]
    for workload in dict.fromkeys(r["workload"] for r in result["rows"]):
        lines += [f"### {workload}: {what[workload]}", ""]
        body = []
        for r in (r for r in result["rows"] if r["workload"] == workload):
            body.append([r["mode"], output.fmt(r["wall_s"], ".1f"), output.fmt(r["speedup_vs_stock"], ".2f"),
                         output.fmt(r["output_tokens_per_s"], ".1f"),
                         f"{output.fmt(r['ttft_p50_s'], '.2f')} / {output.fmt(r['ttft_p99_s'], '.2f')}",
                         f"{output.fmt(r['itl_p50_ms'], '.0f')} / {output.fmt(r['itl_p99_ms'], '.0f')}",
                         output.fmt(r["peak_blocks"], ".0f"), r["peak_running"], output.fmt(r["preemptions"], ".0f"),
                         output.fmt(r["prefix_hit_tokens"], ".0f"),
                         f"{output.fmt(r['compactions'], '.0f')} ({output.fmt(r.get('online_compactions'), '.0f')})",
                         output.fmt(r["compacted_prefix_hits"], ".0f"),
                         r["errors"], _pct(r["same_answer"]), output.fmt(r["agreement_chars"], ".1f"),
                         _pct(r["accuracy"])])
        lines += [*output.table(headers, body), ""]
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    from ..common.plots import workload

    workload(result, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks workload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--tag", help="results file suffix (default: latest, or quick with --quick)")
    for name, field in Config.model_fields.items():
        if name != "workloads":
            parser.add_argument("--" + name.replace("_", "-"), type=field.annotation)
    args = parser.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update({k: v for k, v in vars(args).items() if k in Config.model_fields and v is not None})
    try:
        cfg = Config(**values)
    except ValidationError as exc:
        raise SystemExit(f"workload: {exc}") from exc
    meta = stamp()
    with Servers() as servers, tqdm(total=len(cfg.workloads) * 3, desc="workload", unit="run") as bar:
        data = run(cfg, servers, bar)
    result = {"suite": "workload", "quick": args.quick, "meta": meta, "config": cfg.model_dump(), **data}
    md = markdown(result)
    paths = output.write(result, output.stem("workload", args.quick, args.tag), md, plot)
    print(md)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
