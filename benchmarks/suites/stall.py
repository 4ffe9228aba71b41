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
and the second request's latency. Each preset (``--presets``) gets its own server; ``--sources`` adds
compacting cases with other reference-query sources. Target of issue 20: every compacting case within
1.5× ``plain_prefill``.

    python -m benchmarks stall                        # ~3.8k-token prompt, ratio 0.1 (~10 min on 2 cores)
    python -m benchmarks stall --presets default fast documents quality --sources repeat self_study
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


#: The neighbour's max_tokens: it must still be decoding when the slowest compaction ends.
NEIGHBOUR_TOKENS = 4000


def measure(client, long_prompt_ids: list[int] | None, xargs: dict | None, warm_tokens: int = 8,
            neighbour_tokens: int = NEIGHBOUR_TOKENS, alone_tokens: int = 64) -> dict:
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
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "# Stall: a decoding request's worst inter-token gap",
        "",
        f"`{result['meta']['command']}`  ",
        f"Neighbour decodes greedily; a {cfg['prompt_tokens']}-token prompt arrives (max_tokens 1). "
        f"Compacting cases: am_ratio {cfg['ratio']}, compaction_layers_per_step {cfg['layers_per_step']}; "
        "one server per preset, its compacting case with the preset's own query source unless named.",
        "",
        "| preset | case | worst gap (s) | median gap (s) | neighbour tokens in window | long request (s) | worst gap × plain prefill's |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, block in result["presets"].items():
        plain = block["cases"]["plain_prefill"]["worst_gap_s"]
        for name, row in block["cases"].items():
            ratio = row["worst_gap_s"] / plain if plain and row["worst_gap_s"] and name.startswith("compacting") else None
            lines.append(f"| {preset} | {name} | {fmt(row['worst_gap_s'])} | {fmt(row['median_gap_s'])} | "
                         f"{row['neighbour_tokens_in_window']} | {fmt(row['long_request_s'])} | "
                         f"{'' if ratio is None else f'**{ratio:.2f}×**'} |")
    lines += ["", "Target (issue 20): every compacting case ≤ 1.5× the plain prefill's worst gap."]
    return "\n".join(lines)


def _cases(sources: list[str], ratio: float) -> dict[str, dict | bool | None]:
    """Case name → the long request's am_* keys (None: no long request; False: a plain one)."""
    cases: dict = {"alone": None, "plain_prefill": False, "compacting": {"am_ratio": ratio}}
    for source in sources:
        cases[f"compacting ({source} queries)"] = {"am_ratio": ratio, "am_queries": source}
    return cases


def _measure_server(client, tokenizer, cases: dict, prompt_tokens: int, repeats: int) -> dict:
    """Every case on one server; each keeps its worst run."""
    measure(client, texts.long_ids(tokenizer, 200), None)  # warm-up
    out: dict[str, dict] = {}
    run = 0
    for _ in range(repeats):
        for name, xargs in cases.items():
            # real text at a fresh offset per run: no prefix-cache or compacted-prefix reuse between runs
            run += 1
            prompt = None if xargs is None else texts.long_ids(tokenizer, prompt_tokens, offset=97 * run)
            row = measure(client, prompt, xargs or None)
            print(name, row, flush=True)
            old = out.get(name)
            if old is None or (row["worst_gap_s"] or 0) > (old["worst_gap_s"] or 0):
                out[name] = row
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-tokens", type=int, default=3800)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--presets", nargs="+", default=["default"],
                    help="bundled presets, each served by its own server in turn")
    ap.add_argument("--sources", nargs="*", default=[], choices=["context", "repeat", "self_study"],
                    help="also compact with these query sources (am_queries) on every preset's server")
    ap.add_argument("--layers-per-step", type=int, default=None,
                    help="compaction_layers_per_step of the started server (default: the plugin's default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case; the worst gap is the max over runs")
    ap.add_argument("--url", help="a running plugin server (else one is started per preset)")
    ap.add_argument("--tag", default="latest")
    args = ap.parse_args(argv)

    from harness.server import Server
    from vllm_attnmatch.config import ServerConfig
    from vllm_attnmatch.model import ensure_model

    model = ensure_model()
    tokenizer = texts.tokenizer()
    layers = args.layers_per_step or ServerConfig().compaction_layers_per_step
    cases = _cases(args.sources, args.ratio)
    presets: dict[str, dict] = {}
    for preset in (["served"] if args.url else args.presets):
        server = None
        if args.url:
            from openai import OpenAI

            client = OpenAI(base_url=args.url + "/v1", api_key="unused", timeout=1200, max_retries=0)
        else:
            section = {"preset": preset}
            if args.layers_per_step is not None:
                section["compaction_layers_per_step"] = args.layers_per_step
            # room for the long prompt and for the neighbour's whole stream (its max_tokens)
            server = Server(f"stall-{preset}", model, {"attnmatch": section},
                            max_model_len=max(args.prompt_tokens, NEIGHBOUR_TOKENS) + 256, dumps=False).wait_ready()
            client = server.client()
        try:
            presets[preset] = {"cases": _measure_server(client, tokenizer, cases, args.prompt_tokens, args.repeats)}
        finally:
            if server is not None:
                server.stop()
    result = {
        "suite": "stall",
        "quick": False,
        "meta": stamp(),
        "config": {"prompt_tokens": args.prompt_tokens, "ratio": args.ratio, "layers_per_step": layers,
                   "repeats": args.repeats, "presets": args.presets, "sources": args.sources},
        "presets": presets,
    }
    paths = output.write(result, f"stall_{args.tag}", markdown(result))
    print(markdown(result))
    print("wrote", *paths.values())


if __name__ == "__main__":
    main()
