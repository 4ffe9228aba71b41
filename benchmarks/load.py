"""Load and reliability: many concurrent mixed requests against the plugin server, checked against stock vLLM.

Sends ``--requests`` requests at once (compacting with several methods, non-compacting, compacted-prefix
hits, streaming and non-streaming, some aborted mid-stream by the client) and reports: errors, whether
every non-compacting request produced stock vLLM's greedy tokens (a second server without the plugin
section), and whether the KV pool's free-block count returned to its start value.

    python benchmarks/load.py --requests 64
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    from vllm_attnmatch.launch import Server
    from vllm_attnmatch.model import ensure_model

    text = Path("/usr/share/common-licenses/GPL-3").read_text()
    model = ensure_model()
    plugin = Server("load-plugin", model, {"attnmatch": {"preset": "default"}}, ["--enforce-eager"], kv_cache_gib=1)
    stock = Server("load-stock", model, None, ["--enforce-eager"], kv_cache_gib=1)
    try:
        plugin.wait_ready()
        stock.wait_ready()
        start_free = plugin.wait_idle_free_blocks()
        kinds = ["plain", "plain-stream", "am", "am-stream-abort", "am-prefix", "am-snapkv", "plain-abort", "am-omp"]
        jobs = []
        for i in range(args.requests):
            kind = kinds[i % len(kinds)]
            offset = (i * 97) % 6000 if kind != "am-prefix" else 0
            prompt = text[offset : offset + 1800]
            xargs = None
            if kind.startswith("am"):
                xargs = {"am_ratio": 0.2}
                if kind == "am-snapkv":
                    xargs["am_method"] = "snapkv"
                if kind == "am-omp":
                    xargs["am_method"] = "omp"
            jobs.append((i, kind, prompt, xargs))
        expected = {}
        for i, kind, prompt, _ in jobs:
            if kind in ("plain", "plain-stream"):
                expected[i] = stock.client().completions.create(
                    model="smollm2", prompt=prompt, max_tokens=args.max_tokens, temperature=0
                ).choices[0].text
        results, errors = {}, []

        def run(i, kind, prompt, xargs):
            try:
                client = plugin.client()
                body = {"vllm_xargs": xargs} if xargs else None
                if "stream" in kind or "abort" in kind:
                    stream = client.completions.create(
                        model="smollm2", prompt=prompt, max_tokens=args.max_tokens, temperature=0, stream=True,
                        extra_body=body,
                    )
                    out = ""
                    for n, chunk in enumerate(stream):
                        out += chunk.choices[0].text if chunk.choices else ""
                        if "abort" in kind and n == 2:
                            stream.close()
                            break
                    results[i] = out
                else:
                    results[i] = client.completions.create(
                        model="smollm2", prompt=prompt, max_tokens=args.max_tokens, temperature=0, extra_body=body
                    ).choices[0].text
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{kind}: {type(exc).__name__}: {exc}")

        started = time.perf_counter()
        threads = [threading.Thread(target=run, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - started
        mismatches = sum(results.get(i) != text_ for i, text_ in expected.items())
        end_free = plugin.wait_idle_free_blocks(expected=start_free)
        metrics = plugin.metrics()
    finally:
        plugin.stop()
        stock.stop()
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "requests": args.requests,
        "errors": len(errors),
        "error_samples": errors[:5],
        "uncompacted_checked": len(expected),
        "isolation_mismatches": mismatches,
        "leaked_blocks": start_free - end_free,
        "seconds": round(seconds, 1),
        "compactions": metrics.get("compactions"),
        "failures": metrics.get("failures"),
        "prefix_hits": metrics.get("prefix_hits"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "load_latest.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if not errors and not mismatches and report["leaked_blocks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
