"""Memory and concurrency suite: how many long-context requests fit in a small KV pool at once, with and without
compaction.

A server with a deliberately small pool (``--num-gpu-blocks-override``; the same trick as the end-to-end
"tiny" server) receives k long requests at once (real text at different offsets, ``gen_tokens`` greedy
tokens each, ``ignore_eos``), for every k in ``concurrency``: once stock (no ``am_*`` keys) and once
compacting (``am_ratio``). While they run, ``/metrics`` is polled for the plugin's free-block gauge and
vLLM's KV usage gauge (peak blocks held: the larger of the two) and for vLLM's running/waiting gauges
(peak requests running at once); ``vllm:num_preemptions_total`` says whether any request was preempted. A compacting request still needs
its whole prompt's blocks until its prefix is prefilled and compacted, so it is admitted like a stock
one and shrinks afterwards; the numbers show what that buys under pressure.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel, ConfigDict, model_validator

from ..common import output, plots, texts
from ..common.serving import FREE_BLOCKS, KV_USAGE, Endpoint, ServerSpec, Watcher, delta, peak_blocks_held

NAME = "memory"
RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"


def _default_block_size() -> int:
    """vLLM's KV block: 128 tokens on CPU, 16 on CUDA (decides how many blocks make the pool)."""
    try:
        import torch

        return 16 if torch.cuda.is_available() else 128
    except ImportError:  # pragma: no cover
        return 128


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pool_tokens: int = 4096
    prompt_tokens: int = 1024
    gen_tokens: int = 64
    concurrency: list[int] = [1, 2, 4, 8, 12, 16]
    ratio: float = 0.1
    method: str = "highest_attention"
    block_size: int = 0  # 0: the platform default (128 CPU, 16 CUDA)

    @model_validator(mode="after")
    def _check(self):
        if self.block_size == 0:
            self.block_size = _default_block_size()
        if self.prompt_tokens + self.gen_tokens > self.max_model_len:
            raise ValueError(f"prompt + generated tokens must fit the pool less one block ({self.max_model_len})")
        if not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        self.concurrency = sorted(set(self.concurrency))
        return self

    @property
    def pool_blocks(self) -> int:
        return self.pool_tokens // self.block_size

    @property
    def max_model_len(self) -> int:
        return (self.pool_blocks - 1) * self.block_size  # vLLM keeps one block back (the null block)


QUICK = {"pool_tokens": 1536, "prompt_tokens": 512, "gen_tokens": 16, "concurrency": [1, 4]}


def spec(cfg: Config) -> ServerSpec:
    return ServerSpec(
        f"memory-{cfg.pool_blocks}",
        extra_args=("--enforce-eager", "--num-gpu-blocks-override", str(cfg.pool_blocks), "--max-num-batched-tokens", "512"),
        max_model_len=cfg.max_model_len,
    )


def steps(cfg: Config) -> int:
    return 2 * len(cfg.concurrency)


def _wait_idle(endpoint: Endpoint, timeout_s: float = 60) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        m = endpoint.metrics()
        if not m.get(RUNNING) and not m.get(WAITING):
            return
        time.sleep(0.5)


def _level(endpoint: Endpoint, prompts: list[list[int]], cfg: Config, xargs: dict | None, salt: str,
           total: float | None) -> dict:
    _wait_idle(endpoint)
    before = endpoint.metrics()
    watcher = Watcher(endpoint, (FREE_BLOCKS, RUNNING, WAITING, KV_USAGE))
    errors: list[str] = []

    def one(i: int):
        try:
            return endpoint.stream(prompts[i], cfg.gen_tokens, xargs, f"{salt}-{i}").tokens
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors.append(f"{type(exc).__name__}: {exc}"[:300])
            return 0

    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(one, range(len(prompts))))
    wall = time.perf_counter() - started
    watcher.stop()
    after = endpoint.metrics()
    return {
        "preemptions": delta(before, after, "vllm:num_preemptions_total"),
        "peak_running": int(watcher.high[RUNNING] or 0),
        "peak_waiting": int(watcher.high[WAITING] or 0),
        "peak_blocks_held": peak_blocks_held(watcher, total),
        "peak_kv_usage": watcher.high[KV_USAGE],
        "compactions": delta(before, after, "vllm_attnmatch_compactions_total"),
        "blocks_freed": delta(before, after, "vllm_attnmatch_blocks_freed_total"),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall if wall else None,
        "errors": len(errors),
        "error_samples": errors[:3],
    }


def run(cfg: Config, endpoint: Endpoint, run_id: str, progress) -> dict:
    tok = texts.tokenizer()
    total = endpoint.metrics().get("vllm_attnmatch_kv_total_blocks") or endpoint.num_blocks()
    most = max(cfg.concurrency)
    prompts = [texts.long_ids(tok, cfg.prompt_tokens, offset=97 * i) for i in range(most)]
    modes = {"stock": None, "compacted": {"am_ratio": cfg.ratio, "am_method": cfg.method}}
    rows = []
    for mode, xargs in modes.items():
        for k in cfg.concurrency:
            progress.set_postfix_str(f"{mode} ×{k}")
            rows.append({"mode": mode, "concurrency": k,
                         **_level(endpoint, prompts[:k], cfg, xargs, f"{run_id}-{mode}-{k}", total)})
            progress.update()
    return {"pool_blocks": int(total) if total else cfg.pool_blocks, "block_size": endpoint.block_size(), "rows": rows}


def markdown(result: dict) -> str:
    from ..common import answers
    from ..common.stamp import describe

    cfg = result["config"]
    body = [[r["mode"], r["concurrency"], output.fmt(r["peak_running"], ".0f"), output.fmt(r["peak_waiting"], ".0f"),
             output.fmt(r["preemptions"], ".0f"), output.fmt(r["peak_blocks_held"], ".0f"),
             output.fmt(100 * r["peak_kv_usage"] if r["peak_kv_usage"] is not None else None, ".0f") + " %",
             output.fmt(r["compactions"], ".0f"), output.fmt(r["wall_s"], ".1f"), output.fmt(r["output_tokens_per_s"], ".1f"),
             r["errors"]] for r in result["rows"]]
    lines = [
        f"# Concurrency in a small KV pool{' (quick smoke run)' if result.get('quick') else ''}", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        (f"Pool {result['pool_blocks']} blocks of {result['block_size']} tokens; each request {cfg['prompt_tokens']} prompt "
        f"tokens + {cfg['gen_tokens']} generated; compacted = `am_ratio` {cfg['ratio']} ({cfg['method']})."), "",
        *answers.memory_lines(answers.memory(result)), "",
        *output.table(["mode", "sent at once", "peak running", "peak waiting", "preemptions", "peak blocks held",
                       "peak KV usage", "compactions", "wall s", "output tok/s", "errors"], body),
    ]
    return "\n".join(lines)


plot = plots.memory
