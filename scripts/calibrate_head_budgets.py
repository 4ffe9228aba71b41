"""Write a per-(layer, KV head) budget share file for the engine's ``head_budgets`` setting.

Why calibrate: how many entries a head needs is a property of the model far more than of the text
(the authors precompute it once per model). On a calibration text the heads are scored by how much
softmax mass their keys attract from the text's own queries, the global top ``ratio·T·L·H`` entries are
counted per head, and the counts become shares.

    python scripts/calibrate_head_budgets.py                         # bundled model, LGPL-2.1, r = 0.1
    python scripts/calibrate_head_budgets.py --model DIR --text FILE --out configs/head_budgets/NAME.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vllm_attnmatch.algorithms import global_head_budgets, group_queries, head_scores, save_head_shares
from vllm_attnmatch.algorithms.budgets import shares_from_budgets
from vllm_attnmatch.algorithms.reference_llama import ReferenceLlama

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2)")
    ap.add_argument("--text", default="/usr/share/common-licenses/LGPL-2.1")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--out", default=str(ROOT / "configs" / "head_budgets" / "smollm2-135m.json"))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    if args.model is None:
        from vllm_attnmatch.model import ensure_model

        args.model = ensure_model()
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(Path(args.text).read_text())["input_ids"][: args.tokens]
    model = ReferenceLlama.from_pretrained(args.model)
    _, cache, queries = model.prefill(ids)
    positions = torch.arange(len(ids))
    scores = []
    for kv, q in zip(cache, queries):
        pooled, qpos = group_queries(q, model.num_kv_heads, positions)
        scores.append(head_scores(kv.keys, pooled, qpos, positions, scale=model.scale))
    budgets = global_head_budgets(torch.stack(scores), max(1, int(args.ratio * len(ids))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head_shares(shares_from_budgets(budgets), out)
    per_layer = budgets.float().mean(1)
    print(f"wrote {out}: budgets per head min {int(budgets.min())}, max {int(budgets.max())}, "
          f"uniform {int(args.ratio * len(ids))}; mean per layer {[round(x) for x in per_layer.tolist()]}")


if __name__ == "__main__":
    main()
