"""Does a compaction freeze the batch? A decoding request's worst inter-token gap, three ways.

One plugin server; a "neighbour" request decodes (streamed, greedy, ``ignore_eos``) while, after it has
produced a few tokens, a second request of ``--prompt-tokens`` real tokens arrives:

- ``alone``: no second request;
- ``plain_prefill``: the second request without ``am_*`` keys (stock vLLM stalls its neighbours for
  the prefill too);
- ``compacting``: the same prompt with ``am_ratio`` (a compaction runs over several engine steps, a
  slice of layers per step; see ``compaction_layers_per_step``).

Reported per case: the neighbour's worst and median inter-token gap over the window from the second
request's arrival to its completion (the whole run for ``alone``), the neighbour's tokens in that window,
and the second request's latency. Target of issue 13.3: ``compacting`` within 1.5× ``plain_prefill``.

    python -m benchmarks stall                        # ~3.8k-token prompt, ratio 0.1 (~10 min on 2 cores)
    python -m benchmarks stall --url http://...:8000  # a running plugin server
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from benchmarks.common import output, texts
from benchmarks.common.stamp import stamp


def _neighbour(client, prompt: str, max_tokens: int, stamps: list[float], stop: threading.Event) -> None:
    stream = client.completions.create(
        model="smollm2", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text is not None:
            stamps.append(time.perf_counter())
        if stop.is_set():
            stream.close()
            return


def measure(client, long_prompt_ids: list[int] | None, xargs: dict | None, warm_tokens: int = 8,
            neighbour_tokens: int = 4000, alone_tokens: int = 64) -> dict:
    """One case: the neighbour's gaps while the long request (if any) is served."""
    stamps: list[float] = []
    stop = threading.Event()
    thread = threading.Thread(
        target=_neighbour,
        args=(client, "The history of the printing press begins", neighbour_tokens if long_prompt_ids else alone_tokens,
              stamps, stop),
    )
    thread.start()
    while len(stamps) < warm_tokens and thread.is_alive():
        time.sleep(0.01)
    started = time.perf_counter()
    latency = None
    if long_prompt_ids is not None:
        body = {"vllm_xargs": xargs} if xargs else None
        client.completions.create(model="smollm2", prompt=long_prompt_ids, max_tokens=1, temperature=0, extra_body=body)
        latency = time.perf_counter() - started
        # one more neighbour token after the long request ended closes the window
        seen = len(stamps)
        while len(stamps) == seen and thread.is_alive():
            time.sleep(0.01)
        stop.set()
    thread.join()
    ended = time.perf_counter() if latency is not None else stamps[-1]
    window = [t for t in stamps if t >= started]
    # include the gap from the last token before the window into it
    before = [t for t in stamps if t < started]
    points = ([before[-1]] if before else []) + [t for t in window if t <= ended + 60]
    gaps = [b - a for a, b in zip(points, points[1:])]
    return {
        "worst_gap_s": max(gaps) if gaps else None,
        "median_gap_s": statistics.median(gaps) if gaps else None,
        "neighbour_tokens_in_window": len(window),
        "long_request_s": latency,
    }


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [
        "# Stall: a decoding request's worst inter-token gap",
        "",
        f"Neighbour decodes greedily; a {cfg['prompt_tokens']}-token prompt arrives (max_tokens 1). "
        f"Compacting case: am_ratio {cfg['ratio']}, compaction_layers_per_step {cfg['layers_per_step']}.",
        "",
        "| case | worst gap (s) | median gap (s) | neighbour tokens in window | long request (s) |",
        "|---|---|---|---|---|",
    ]
    for name, row in result["cases"].items():
        fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"| {name} | {fmt(row['worst_gap_s'])} | {fmt(row['median_gap_s'])} | "
                     f"{row['neighbour_tokens_in_window']} | {fmt(row['long_request_s'])} |")
    ratio = result.get("compacting_over_plain")
    if ratio is not None:
        lines += ["", f"compacting / plain prefill worst gap: **{ratio:.2f}×** (target ≤ 1.5×)"]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=3800)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--layers-per-step", type=int, default=None,
                    help="compaction_layers_per_step of the started server (default: the plugin's default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case; the worst gap is the max over runs")
    ap.add_argument("--url", help="a running plugin server (else one is started)")
    ap.add_argument("--tag", default="latest")
    args = ap.parse_args(argv)

    from harness.server import Server
    from vllm_attnmatch.config import ServerConfig
    from vllm_attnmatch.model import ensure_model

    model = ensure_model()
    tokenizer = texts.tokenizer()
    layers = args.layers_per_step or ServerConfig().compaction_layers_per_step
    server = None
    if args.url:
        from openai import OpenAI

        client = OpenAI(base_url=args.url + "/v1", api_key="unused", timeout=1200, max_retries=0)
    else:
        section = {"preset": "default"}
        if args.layers_per_step is not None:
            section["compaction_layers_per_step"] = args.layers_per_step
        server = Server("stall", model, {"attnmatch": section}, max_model_len=args.prompt_tokens + 256,
                        dumps=False).wait_ready()
        client = server.client()
    try:
        measure(client, texts.long_ids(tokenizer, 200), None)  # warm-up
        cases: dict[str, dict] = {}
        variants = {"alone": None, "plain_prefill": False, "compacting": {"am_ratio": args.ratio}}
        run = 0
        for _ in range(args.repeats):
            for name, xargs in variants.items():
                # real text at a fresh offset per run: no prefix-cache or compacted-prefix reuse between runs
                run += 1
                prompt = None if xargs is None else texts.long_ids(tokenizer, args.prompt_tokens, offset=97 * run)
                row = measure(client, prompt, xargs or None)
                print(name, row, flush=True)
                old = cases.get(name)
                if old is None or (row["worst_gap_s"] or 0) > (old["worst_gap_s"] or 0):
                    cases[name] = row
    finally:
        if server is not None:
            server.stop()
    plain, compacting = cases["plain_prefill"]["worst_gap_s"], cases["compacting"]["worst_gap_s"]
    result = {
        "suite": "stall",
        "quick": False,
        "meta": stamp(),
        "config": {"prompt_tokens": args.prompt_tokens, "ratio": args.ratio, "layers_per_step": layers, "repeats": args.repeats},
        "cases": cases,
        "compacting_over_plain": compacting / plain if plain and compacting else None,
    }
    paths = output.write(result, f"stall_{args.tag}", markdown(result))
    print(markdown(result))
    print("wrote", *paths.values())


if __name__ == "__main__":
    main()
