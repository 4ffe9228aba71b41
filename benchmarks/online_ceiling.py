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

    python benchmarks/online_ceiling.py                     # ceiling 512, 700 tokens (~6 min on 2 cores)
    python benchmarks/online_ceiling.py --ceiling 1024 --tokens 1500
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

RESULTS = Path(__file__).parent / "results"
TEXT = Path("/usr/share/common-licenses/GPL-3")
VARIANTS = {
    "unlimited": None,
    "attention_matching": {"am_method": "highest_attention"},
    "sliding_window": {"am_method": "streaming"},
}


def _generate(client, prompt_ids, tokens, xargs):
    started = time.perf_counter()
    result = client.completions.create(
        model="smollm2", prompt=prompt_ids, max_tokens=tokens, temperature=0, logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **({"vllm_xargs": xargs} if xargs else {})},
    )
    seconds = time.perf_counter() - started
    token_ids = [int(t.removeprefix("token_id:")) for t in result.choices[0].logprobs.tokens]
    return result, token_ids, seconds


def _prompt_logprobs(server, prompt_ids, xargs):
    """Per position: (logprob of the actual token, top-1 token id) under the given keys."""
    import requests

    body = {"model": "smollm2", "prompt": prompt_ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}
    if xargs:
        body["vllm_xargs"] = xargs
    data = requests.post(server.url + "/v1/completions", json=body, timeout=3600).json()
    rows = data["choices"][0]["prompt_logprobs"]
    out = []
    for token_id, row in zip(prompt_ids, rows):
        if row is None:
            out.append(None)
            continue
        actual = row[str(token_id)]["logprob"]
        top = min(row.items(), key=lambda kv: kv[1]["rank"])[0]
        out.append((actual, int(top)))
    return out


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

    from transformers import AutoTokenizer

    from vllm_attnmatch.launch import Server
    from vllm_attnmatch.model import ensure_model

    folder = ensure_model()
    tok = AutoTokenizer.from_pretrained(folder)
    prompt_ids = tok(TEXT.read_text())["input_ids"][: args.prompt_tokens]
    server = Server("online-bench", folder, {"attnmatch": {"preset": "default"}}, ["--enforce-eager"]).wait_ready()
    try:
        client = server.client()
        runs = {}
        for name, keys in tqdm(VARIANTS.items(), desc="generate"):
            xargs = None if keys is None else {**keys, "am_max_kv_tokens": args.ceiling}
            log_start = len(server.log())
            _, tokens, seconds = _generate(client, prompt_ids, args.tokens, xargs)
            logical, peak = _online_events(server.log()[log_start:])
            runs[name] = {"xargs": xargs, "tokens": tokens, "seconds": round(seconds, 1),
                          "compactions_at_logical_length": logical, "peak_kv_entries": peak}
        reference = runs["unlimited"]["tokens"]
        first = min(runs["attention_matching"]["compactions_at_logical_length"] or [len(prompt_ids)])
        start = max(0, first - len(prompt_ids))  # generated tokens before the first compaction are exact
        full_ids = prompt_ids + reference
        teacher_ref = _prompt_logprobs(server, full_ids, None)
        rows = []
        for name, run in tqdm(runs.items(), desc="teacher-forced"):
            if name == "unlimited":
                continue
            same = [a == b for a, b in zip(run["tokens"][start:], reference[start:])]
            before_divergence = next((i for i, s in enumerate(same) if not s), len(same))
            forced = _prompt_logprobs(server, full_ids, run["xargs"])
            positions = range(len(prompt_ids) + start, len(full_ids))
            top1 = [forced[i][1] == teacher_ref[i][1] for i in positions]
            nll = -sum(forced[i][0] for i in positions) / len(positions)
            nll_full = -sum(teacher_ref[i][0] for i in positions) / len(positions)
            rows.append({
                "variant": name,
                "greedy_agreement": round(sum(same) / max(1, len(same)), 4),
                "tokens_before_divergence": before_divergence,
                "teacher_forced_top1": round(sum(top1) / len(top1), 4),
                "delta_nll_pct": round(100 * (nll - nll_full) / nll_full, 2),
                "online_compactions": len(run["compactions_at_logical_length"]),
                "peak_kv_entries": run["peak_kv_entries"],
                "seconds": run["seconds"],
            })
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": f"{platform.machine()} {platform.processor() or ''} ({__import__('os').cpu_count()} cores)",
            "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
            "ceiling": args.ceiling, "prompt_tokens": len(prompt_ids), "generated_tokens": args.tokens,
            "scored_from_generated_token": start, "unlimited_seconds": runs["unlimited"]["seconds"],
            "rows": rows,
        }
    finally:
        server.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"Ceiling {args.ceiling} KV entries, {len(prompt_ids)}-token prompt, {args.tokens} greedy tokens; scored over "
        f"the {args.tokens - start} tokens after the first compaction. `{result['command']}`",
        "",
        "| variant | greedy agreement | tokens before divergence | teacher-forced top-1 | ΔNLL % | online compactions | "
        "peak KV entries | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['greedy_agreement']:.3f} | {r['tokens_before_divergence']} | "
                     f"{r['teacher_forced_top1']:.3f} | {r['delta_nll_pct']:+.2f} | {r['online_compactions']} | "
                     f"{r['peak_kv_entries']} | {r['seconds']} |")
    lines.append(f"| unlimited | 1 | – | 1 | 0 | 0 | {len(prompt_ids) + args.tokens} | {runs['unlimited']['seconds']} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    assert all(math.isfinite(r["delta_nll_pct"]) for r in rows)


if __name__ == "__main__":
    main()
