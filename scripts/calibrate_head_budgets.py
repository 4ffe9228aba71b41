"""Write a per-(layer, KV head) budget share file for the engine's ``head_budgets`` setting.

Why calibrate: how many entries a head needs is a property of the model far more than of the text
(the authors precompute it once per model). On a calibration text, each head's keys are ranked by the
softmax mass they attract from the text's own queries, and the head's share is proportional to how many
of its top keys it takes to cover ``--coverage`` of that mass: a head with sharp attention is served by a
few entries, a head with diffuse attention needs many. (Counting each head's keys in the global top
``ratio·T·L·H`` instead gave budgets to the sharp heads and measured worse than uniform.)

    python scripts/calibrate_head_budgets.py                         # bundled model, LGPL-2.1, r = 0.1
    python scripts/calibrate_head_budgets.py --model DIR --text FILE --out vllm_attnmatch/configs/head_budgets/NAME.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vllm_attnmatch.algorithms import group_queries, head_budgets, head_scores, save_head_shares
from vllm_attnmatch.algorithms.reference_llama import ReferenceLlama

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled SmolLM2)")
    ap.add_argument("--text", default="/usr/share/common-licenses/LGPL-2.1")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--ratio", type=float, default=0.1, help="only for the printed budgets")
    ap.add_argument("--coverage", type=float, default=0.9)
    ap.add_argument("--out", default=str(ROOT / "vllm_attnmatch" / "configs" / "head_budgets" / "smollm2-135m.json"))
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
    needed = []
    for kv, q in zip(cache, queries):
        pooled, qpos = group_queries(q, model.num_kv_heads, positions)
        scores = head_scores(kv.keys, pooled, qpos, positions, scale=model.scale)  # (H, T)
        mass = scores.sort(dim=-1, descending=True).values.cumsum(-1)
        needed.append((mass < args.coverage * mass[:, -1:]).sum(-1).float() + 1)
    needed = torch.stack(needed)  # (L, H) keys to cover the mass
    shares = {(layer, head): float(needed[layer, head] / needed.sum())
              for layer in range(needed.shape[0]) for head in range(needed.shape[1])}
    budgets = head_budgets(shares, needed.shape[0], needed.shape[1], len(ids), max(1, int(args.ratio * len(ids))))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_head_shares(shares, out)
    per_layer = budgets.float().mean(1)
    print(f"wrote {out}: budgets per head min {int(budgets.min())}, max {int(budgets.max())}, "
          f"uniform {int(args.ratio * len(ids))}; mean per layer {[round(x) for x in per_layer.tolist()]}")


if __name__ == "__main__":
    main()
