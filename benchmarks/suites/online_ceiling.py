"""A long generation under a KV ceiling (``am_max_kv_tokens``) against the same generation with unlimited KV.

One real prompt (the start of GPL-3) is continued greedily for ``--tokens`` tokens three ways on the same
server: unlimited (no ``am_*`` keys), Attention Matching at the ceiling, and a sliding window at the same
ceiling (``am_method=streaming``: keep the sinks and the newest entries, drop the rest, no fit). Reported
over the tokens generated after the first compaction:

- free-running greedy agreement with the unlimited run (fraction of equal tokens position by position, and
  how many tokens agree before the first divergence);
- teacher-forced top-1 agreement and ΔNLL: the unlimited run's text is fed back as a prompt under the same
  ceiling (prefill chunks stop at the ceiling and compact exactly where decode would), and vLLM's prompt
  logprobs say what the compacted model predicts at every position;
- the online compactions, peak KV entries (from the server log) and wall time.

    python -m benchmarks.suites.online_ceiling                     # ceiling 512, 700 tokens (~6 min on 2 cores)
    python -m benchmarks.suites.online_ceiling --ceiling 1024 --tokens 1500
"""

from __future__ import annotations

import argparse
import re
import time

from tqdm import tqdm

from benchmarks.common import output, texts
from benchmarks.common.scoring import score
from benchmarks.common.serving import Endpoint
from benchmarks.common.stamp import describe, stamp

VARIANTS = {
    "unlimited": None,
    "attention_matching": {"am_method": "highest_attention"},
    "sliding_window": {"am_method": "streaming"},
}


def _generate(client, prompt_ids, tokens, xargs):
    """Greedy token ids of a completion and its seconds."""
    started = time.perf_counter()
    result = client.completions.create(
        model="smollm2", prompt=prompt_ids, max_tokens=tokens, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **({"vllm_xargs": xargs} if xargs else {})},
    )
    seconds = time.perf_counter() - started
    return [int(t.removeprefix("token_id:")) for t in result.choices[0].logprobs.tokens], seconds


def _online_events(log: str) -> tuple[list[int], int]:
    logical = [int(m.group(1)) for m in re.finditer(r"\(online #\d+, logical length (\d+)\)", log)]
    peaks = [int(m.group(1)) for m in re.finditer(r"peak KV entries (\d+)", log)]
    return logical, max(peaks) if peaks else 0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ceiling", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=700)
    ap.add_argument("--prompt-tokens", type=int, default=300)
    ap.add_argument("--out", default="online_ceiling_latest")
    args = ap.parse_args(argv)

    from harness.server import Server
    from vllm_attnmatch.model import ensure_model

    meta = stamp()
    folder = ensure_model()
    prompt_ids = texts.token_ids(texts.tokenizer(str(folder)), "GPL-3")[: args.prompt_tokens]
    server = Server("online-bench", folder, {"attnmatch": {"preset": "default"}}, ["--enforce-eager"],
                    dumps=False).wait_ready()
    try:
        client = server.client()
        runs = {}
        for name, keys in tqdm(VARIANTS.items(), desc="generate"):
            xargs = None if keys is None else {**keys, "am_max_kv_tokens": args.ceiling}
            log_start = len(server.log())
            tokens, seconds = _generate(client, prompt_ids, args.tokens, xargs)
            logical, peak = _online_events(server.log()[log_start:])
            runs[name] = {"xargs": xargs, "tokens": tokens, "seconds": round(seconds, 1),
                          "compactions_at_logical_length": logical, "peak_kv_entries": peak}
        reference = runs["unlimited"]["tokens"]
        first = min(runs["attention_matching"]["compactions_at_logical_length"] or [len(prompt_ids)])
        start = max(0, first - len(prompt_ids))  # generated tokens before the first compaction are exact
        full_ids = prompt_ids + reference
        endpoint = Endpoint(server.url)
        teacher_ref, _ = endpoint.prompt_logprobs(full_ids)
        rows = []
        for name, run in tqdm(runs.items(), desc="teacher-forced"):
            if name == "unlimited":
                continue
            same = [a == b for a, b in zip(run["tokens"][start:], reference[start:])]
            before_divergence = next((i for i, s in enumerate(same) if not s), len(same))
            forced, _ = endpoint.prompt_logprobs(full_ids, run["xargs"])
            scored = len(prompt_ids) + start
            fidelity = score(teacher_ref, forced, full_ids[scored:], scored, scored)
            rows.append({
                "variant": name,
                "greedy_agreement": round(sum(same) / max(1, len(same)), 4),
                "tokens_before_divergence": before_divergence,
                "teacher_forced_top1": fidelity["top1_agreement"],
                "kl_at_20": fidelity["kl"],
                "delta_nll_pct": fidelity["delta_nll_pct"],
                "online_compactions": len(run["compactions_at_logical_length"]),
                "peak_kv_entries": run["peak_kv_entries"],
                "seconds": run["seconds"],
            })
        config = {"ceiling": args.ceiling, "prompt_tokens": len(prompt_ids), "generated_tokens": args.tokens,
                  "scored_from_generated_token": start, "unlimited_seconds": runs["unlimited"]["seconds"]}
    finally:
        server.stop()
    lines = [
        f"Ceiling {args.ceiling} KV entries, {len(prompt_ids)}-token prompt, {args.tokens} greedy tokens; scored over "
        f"the {args.tokens - start} tokens after the first compaction. `{meta['command']}`",
        "",
        describe(meta),
        "",
        *output.table(
            ["variant", "greedy agreement", "tokens before divergence", "teacher-forced top-1", "KL@20", "ΔNLL %",
             "online compactions", "peak KV entries", "seconds"],
            [[r["variant"], f"{r['greedy_agreement']:.3f}", r["tokens_before_divergence"],
              f"{r['teacher_forced_top1']:.3f}", f"{r['kl_at_20']:.4f}", f"{r['delta_nll_pct']:+.2f}",
              r["online_compactions"], r["peak_kv_entries"], r["seconds"]] for r in rows]
            + [["unlimited", 1, "–", 1, 0, 0, 0, len(prompt_ids) + args.tokens, runs["unlimited"]["seconds"]]],
        ),
    ]
    output.write({"suite": "online_ceiling", "meta": meta, "config": config, "rows": rows}, args.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
