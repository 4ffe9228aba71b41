"""Memory of one 4096-token compaction: the server's peak RSS, and what the reference-query capture holds.

Starts a plugin server (CPU, float32, the bundled model), warms it up, then sends one ``--prompt-tokens``
prompt with ``am_ratio`` and samples the resident memory of the server's whole process tree (API server +
EngineCore) every 20 ms. Reported: RSS before the request, peak RSS during it, the difference, and the
captured reference queries' size computed from the capture rule (rows = min(span, max_query_tokens),
every query head, per layer) in the model dtype against the fp32 copies the plugin kept before.

    python -m benchmarks capture-memory                 # 4096 tokens, ratio 0.1
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time

import psutil

from benchmarks.common import output, texts
from benchmarks.common.stamp import stamp


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=4096)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--tag", default="latest")
    args = ap.parse_args(argv)

    from harness.server import Server
    from vllm_attnmatch.config import ServerConfig
    from vllm_attnmatch.model import ensure_model

    model = ensure_model()
    tok = texts.tokenizer()
    config = json.loads((model / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    prompt = texts.long_ids(tok, args.prompt_tokens, offset=11)
    server = Server("capmem", model, {"attnmatch": {"preset": "default"}}, max_model_len=args.prompt_tokens + 256,
                    dumps=False).wait_ready()
    try:
        client = server.client()
        client.completions.create(model="smollm2", prompt=texts.long_ids(tok, 256), max_tokens=2, temperature=0)
        time.sleep(2)
        baseline = _tree_rss(server.proc.pid)
        peak, done = baseline, threading.Event()

        def sample():
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _tree_rss(server.proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.perf_counter()
        before = server.metrics()
        client.completions.create(model="smollm2", prompt=prompt, max_tokens=1, temperature=0,
                                  extra_body={"vllm_xargs": {"am_ratio": args.ratio}})
        seconds = time.perf_counter() - started
        done.set()
        sampler.join()
        after = server.metrics()
    finally:
        server.stop()
    settings = ServerConfig()
    span = (args.prompt_tokens - 16) // 128 * 128  # default preset: keep_last 16; spans end on a 128-token block
    stride = max(1, math.ceil(span / settings.max_query_tokens))
    rows = math.ceil(span / stride)
    dtype_bytes = 4  # the served model runs in float32 here (bf16 on a GPU: 2)
    result = {
        "suite": "capture_memory",
        "quick": False,
        "meta": stamp(),
        "config": {"prompt_tokens": args.prompt_tokens, "ratio": args.ratio, "dtype": "float32"},
        "compacted": after.get("compactions", 0) - before.get("compactions", 0),
        "seconds": seconds,
        "rss_before_mib": baseline / 2**20,
        "rss_peak_mib": peak / 2**20,
        "rss_growth_mib": (peak - baseline) / 2**20,
        "captured_rows": rows,
        "captured_query_mib_model_dtype": layers * rows * heads * head_dim * dtype_bytes / 2**20,
        "captured_query_mib_bf16": layers * rows * heads * head_dim * 2 / 2**20,
        "captured_query_mib_fp32_before": layers * rows * heads * head_dim * 4 / 2**20,
    }
    md = "\n".join([
        f"# Memory of one {args.prompt_tokens}-token compaction (am_ratio {args.ratio}, float32 CPU server)",
        "",
        "| measure | value |",
        "|---|---|",
        f"| server RSS before (MiB) | {result['rss_before_mib']:.0f} |",
        f"| server RSS peak during the request (MiB) | {result['rss_peak_mib']:.0f} |",
        f"| growth (MiB) | {result['rss_growth_mib']:.0f} |",
        f"| captured reference rows | {rows} × {heads} heads × {layers} layers |",
        f"| captured queries, model dtype here (MiB) | {result['captured_query_mib_model_dtype']:.0f} |",
        f"| the same in bf16 on a GPU (MiB; fp32 before this change) | {result['captured_query_mib_bf16']:.0f} "
        f"({result['captured_query_mib_fp32_before']:.0f}) |",
        f"| compactions / seconds | {result['compacted']:.0f} / {seconds:.1f} |",
    ])
    paths = output.write(result, f"capture_memory_{args.tag}", md)
    print(md)
    print("wrote", *paths.values())


if __name__ == "__main__":
    main()
