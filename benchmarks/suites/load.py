"""Load and reliability: many concurrent mixed requests against the plugin server, checked against stock vLLM.

Sends ``--requests`` requests at once (compacting with several methods, non-compacting, compacted-prefix
hits, streaming and non-streaming, some aborted mid-stream by the client) and reports: errors, whether
every non-compacting request produced stock vLLM's greedy tokens (a second server without the plugin
section), and whether the KV pool's free-block count returned to its start value. The load itself is
``harness.server.run_mixed_load``, shared with the end-to-end tests.

    python -m benchmarks load --requests 64
    python -m benchmarks load --requests 64 --capture-budget-mib 8 --tag tiny_capture   # most compactions refused
"""

from __future__ import annotations

import argparse
import json

from ..common import output, texts
from ..common.serving import PLUGIN
from ..common.stamp import stamp


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--capture-budget-mib", type=float,
                        help="the plugin's capture_budget_mib (default: derived from the configuration); a tiny "
                             "one makes most compactions wait or be refused, which must cost no request")
    parser.add_argument("--tag", default="latest", help="results file suffix")
    args = parser.parse_args(argv)

    from harness.server import Server, run_mixed_load
    from vllm_attnmatch.model import ensure_model

    meta = stamp()
    model = ensure_model()
    section = dict(PLUGIN["attnmatch"])
    if args.capture_budget_mib is not None:
        section["capture_budget_mib"] = args.capture_budget_mib
    plugin = Server("load-plugin", model, {"attnmatch": section}, ["--enforce-eager"], kv_cache_gib=1, dumps=False)
    stock = Server("load-stock", model, None, ["--enforce-eager"], kv_cache_gib=1, dumps=False)
    try:
        plugin.wait_ready()
        stock.wait_ready()
        report = run_mixed_load(plugin, stock, texts.read("GPL-3"), args.requests, args.max_tokens)
        metrics = plugin.metrics()
    finally:
        plugin.stop()
        stock.stop()
    report.update(compactions=metrics.get("compactions"), failures=metrics.get("failures"),
                  prefix_hits=metrics.get("prefix_hits"), capture_refused=metrics.get("capture_refused"),
                  capture_budget_mib=args.capture_budget_mib)
    result = {"suite": "load", "meta": meta, **report}
    output.write(result, f"load_{args.tag}", "```json\n" + json.dumps(result, indent=1) + "\n```")
    print(json.dumps(report, indent=1))
    return 0 if not report["errors"] and not report["isolation_mismatches"] and report["leaked_blocks"] == 0 else 1
