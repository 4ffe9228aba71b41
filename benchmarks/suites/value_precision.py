"""Does the value fit need float64? float32 against float64 ridge solves on every layer of a real prefill.

The value fit (``algorithms.values.ridge_path``) factorises one ``G + λI`` per ridge strength and head. In
float32 that costs about half of float64 on a CPU, but small ridges make the systems ill-conditioned, so
the question is whether the fit's *choices* change, not only its digits. For each layer of the reference
forward over ``--tokens`` tokens of DEV text (licences laid end to end), the same compaction runs twice,
once per precision, and the table compares the held-out output error, the ridge chosen per head, the
gate, and the values themselves.

    python -m benchmarks.suites.value_precision                      # 4096 tokens, the default preset
    python -m benchmarks.suites.value_precision --tokens 2048 --method highest_attention --options '{}'

Writes ``benchmarks/results/value_precision_<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the benchmarks package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch

from benchmarks.common import output, texts
from benchmarks.common.stamp import describe, stamp

PRECISIONS = ("float64", "float32")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--ratio", type=float, default=0.1)
    p.add_argument("--method", default="omp")
    p.add_argument("--options", default='{"recent": 0.5, "max_queries": 1024}',
                   help="JSON algorithm options (default: the default preset's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="dev")
    return p.parse_args(argv)


def measure(args) -> list[dict]:
    from vllm_attnmatch.algorithms import compact, group_queries
    from vllm_attnmatch.algorithms.reference_llama import ReferenceLlama
    from vllm_attnmatch.model import ensure_model

    folder = ensure_model()
    ids = texts.long_ids(texts.tokenizer(str(folder)), args.tokens)
    model = ReferenceLlama.from_pretrained(folder)
    _, cache, queries = model.prefill(ids)
    T = len(ids)
    span = slice(4, T - 16)
    pooled_positions = torch.arange(T)[span]
    options = json.loads(args.options)
    rows = []
    for layer, (kv, q) in enumerate(zip(cache, queries)):
        pooled, qpos = group_queries(q[span], model.num_kv_heads, pooled_positions)
        runs = {p: compact(kv.keys[:, span], kv.values[:, span], pooled, int(args.ratio * (T - 20)), args.method,
                           query_positions=qpos, key_positions=pooled_positions, value_dtype=p, **options)
                for p in PRECISIONS}
        a, b = runs["float64"], runs["float32"]
        rows.append({
            "layer": layer,
            "heldout_error": {p: float(r.heldout_output_error.mean()) for p, r in runs.items()},
            "same_ridges": a.info.get("value_alpha") == b.info.get("value_alpha"),
            "same_gate": bool(torch.equal(a.gate, b.gate)),
            "values_relative_difference": float((a.values - b.values).norm() / a.values.norm().clamp_min(1e-30)),
            "values_seconds": {p: r.timings.get("values", 0.0) for p, r in runs.items()},
        })
        print(f"layer {layer}: same ridges {rows[-1]['same_ridges']}, same gate {rows[-1]['same_gate']}, "
              f"values differ by {rows[-1]['values_relative_difference']:.2g}", flush=True)
    return rows


def markdown(result: dict) -> str:
    rows, cfg = result["rows"], result["config"]
    n = len(rows)

    def total(key, p):
        return sum(r[key][p] for r in rows)

    return "\n".join([
        "# Value fit precision: float32 against float64", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        f"{cfg['tokens']} tokens of DEV text, method `{cfg['method']}` with options `{cfg['options']}`, "
        f"ratio {cfg['ratio']}, every layer compacted once per precision.", "",
        *output.table(["", "float64", "float32"], [
            ["mean held-out output error", f"{total('heldout_error', 'float64') / n:.5f}",
             f"{total('heldout_error', 'float32') / n:.5f}"],
            ["value fit seconds (all layers)", f"{total('values_seconds', 'float64'):.2f}",
             f"{total('values_seconds', 'float32'):.2f}"],
        ]), "",
        f"- Same ridge chosen for every head in {sum(r['same_ridges'] for r in rows)}/{n} layers; same gate in "
        f"{sum(r['same_gate'] for r in rows)}/{n}.",
        f"- Largest relative difference of the fitted values: {max(r['values_relative_difference'] for r in rows):.2g}.",
    ])


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"suite": "value_precision", "meta": stamp(argv), "config": vars(args), "rows": measure(args)}
    md = markdown(result)
    print(md)
    paths = output.write(result, f"value_precision_{args.tag}", md)
    print("wrote", ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
