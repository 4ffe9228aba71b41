"""N questions on one document: prefill work, latency and KV blocks with and without compacted-prefix reuse.

Three ways to serve the same N requests (document + question i), one after the other:
- ``plain prefix cache``: no ``am_*`` keys; vLLM's own prefix cache reuses the uncompacted document;
- ``compact, no reuse``: ``am_ratio`` with a distinct ``cache_salt`` per request, so every request
  prefills and compacts the document itself;
- ``compact + reuse``: ``am_ratio``; the first request compacts, the others reuse the stored prefix.

Reported per mode: prompt tokens actually prefilled (prompt tokens minus vLLM's prefix-cache hits minus
the plugin's compacted-prefix savings), total and mean time to first token, and the peak number of KV
blocks held (the plugin's free-block gauge, polled while the requests run).

    python benchmarks/prefix_reuse.py [--url URL] [--questions 8] [--ratio 0.1]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"
QUESTIONS = [
    "Who may copy and distribute this license?",
    "What does the word 'free' refer to in this text?",
    "What must be done when conveying the source code?",
    "What is the purpose of this license?",
    "What happens if you violate the terms of the license?",
    "Which rights does the license give to recipients?",
    "What does 'the Program' mean here?",
    "What is said about warranties?",
    "How can patents threaten free software?",
    "What should a developer do to protect the users' rights?",
]


def _counters(url) -> dict[str, float]:
    values = {}
    for line in requests.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        name = name.split("{", 1)[0]
        if name in ("vllm:prompt_tokens_total", "vllm:prefix_cache_hits_total") or name.startswith("vllm_attnmatch_"):
            values[name] = values.get(name, 0.0) + float(value)
    return values


class BlockWatcher:
    """Polls the free-block gauge in the background; ``peak_held`` is relative to the start value."""

    def __init__(self, url: str):
        self.url, self.start = url, _counters(url)["vllm_attnmatch_kv_free_blocks"]
        self.lowest, self._stop = self.start, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            self.lowest = min(self.lowest, _counters(self.url)["vllm_attnmatch_kv_free_blocks"])
            time.sleep(0.05)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.start - self.lowest


def _ask(url, model, prompt_ids, xargs, salt):
    body = {"model": model, "prompt": prompt_ids, "max_tokens": 8, "temperature": 0, "stream": True}
    if xargs:
        body["vllm_xargs"] = xargs
    if salt:
        body["cache_salt"] = salt
    started = time.perf_counter()
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line:
                return time.perf_counter() - started


def run_mode(args, tokenizer, doc, mode, run_id) -> dict:
    before = _counters(args.url)
    watcher = BlockWatcher(args.url)
    ttfts = []
    for i in tqdm(range(args.questions), desc=mode, leave=False):
        question = tokenizer(f"\n\nQuestion: {QUESTIONS[i % len(QUESTIONS)]}\nAnswer:")["input_ids"]
        xargs = None if mode == "plain prefix cache" else {"am_ratio": args.ratio}
        salt = f"{run_id}-{mode}-{i}" if mode == "compact, no reuse" else f"{run_id}-{mode}"
        ttfts.append(_ask(args.url, args.model, doc + question, xargs, salt))
    time.sleep(0.5)
    peak = watcher.stop()
    after = _counters(args.url)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    prompt = delta["vllm:prompt_tokens_total"]
    prefilled = prompt - delta["vllm:prefix_cache_hits_total"] - delta.get("vllm_attnmatch_prefill_tokens_saved_total", 0.0)
    return {
        "mode": mode,
        "prompt_tokens": prompt,
        "prefilled_tokens": prefilled,
        "compactions": delta.get("vllm_attnmatch_compactions_total", 0.0),
        "ttft_total_s": sum(ttfts),
        "ttft_first_s": ttfts[0],
        "ttft_rest_mean_s": sum(ttfts[1:]) / max(1, len(ttfts) - 1),
        "peak_blocks_held": peak,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--doc-tokens", type=int, default=2048, help="a multiple of the KV block size")
    args = parser.parse_args(argv)

    import vllm
    from transformers import AutoTokenizer

    from vllm_attnmatch.launch import Server
    from vllm_attnmatch.model import ensure_model

    tokenizer = AutoTokenizer.from_pretrained(str(ensure_model()))
    doc = tokenizer(Path("/usr/share/common-licenses/GPL-3").read_text())["input_ids"][: args.doc_tokens]
    server = None
    if args.url is None:
        server = Server("prefix-bench", ensure_model(), {"attnmatch": {"preset": "default"}}, kv_cache_gib=2)
        args.url = server.wait_ready().url
    run_id = datetime.now(timezone.utc).strftime("%H%M%S")
    try:
        rows = [run_mode(args, tokenizer, doc, m, run_id) for m in ("plain prefix cache", "compact, no reuse", "compact + reuse")]
    finally:
        if server is not None:
            server.stop()
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {platform.system()}",
        "vllm": vllm.__version__,
        "questions": args.questions,
        "doc_tokens": len(doc),
        "ratio": args.ratio,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    base = RESULTS / "prefix_reuse_latest"
    base.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"# {args.questions} questions on one {len(doc)}-token document (ratio {args.ratio}) — {meta['date']}",
        "",
        f"Command: `{meta['command']}`; {meta['machine']}; vLLM {meta['vllm']}",
        "",
        "| mode | prompt tokens | prefilled tokens | compactions | TTFT first (s) | TTFT others, mean (s) | total TTFT (s) | peak KV blocks held |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['prompt_tokens']:.0f} | {r['prefilled_tokens']:.0f} | {r['compactions']:.0f} | "
            f"{r['ttft_first_s']:.2f} | {r['ttft_rest_mean_s']:.2f} | {r['ttft_total_s']:.2f} | {r['peak_blocks_held']:.0f} |"
        )
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
