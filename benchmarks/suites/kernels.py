"""Time each Triton kernel of ``vllm_attnmatch.kernels`` against its torch reference on realistic shapes.

On CUDA (default shapes: d = 128, H_kv = 8, G = H_q / H_kv = 4, T up to 32k) every case is also checked
against the reference (max abs difference recorded), printed as a table and written as JSON, stamped with
the machine, versions and command, to ``benchmarks/results/kernels_<gpu>_<utc time>.json``.
Without CUDA it says so and exits 0; ``--interpret`` then runs tiny shapes through Triton's CPU interpreter
as a smoke check (its timings mean nothing and are not written unless ``--out`` is given).

  python benchmarks/suites/kernels.py                         # GPU, all kernels, T = 4096, 16384, 32768
  python benchmarks/suites/kernels.py --kernels paged_decode --seq-lens 32768 --batch 32
  python benchmarks/suites/kernels.py --interpret             # CPU smoke check

``paged_decode`` also times vLLM's own Triton decode kernel (``unified_attention``, no β) at the same KV
length and batch when it can be imported (row ``vllm_decode``): the cost of the β-aware kernel against
what stock vLLM runs. The suite form, ``python -m benchmarks run --suite kernels``, writes
``benchmarks/results/kernels_latest.{json,md,png}``.
"""

# ruff: noqa: B023 - each case's closures run inside its own loop iteration
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the benchmarks package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parents[2])

try:  # the suite form needs pydantic; the script form (e.g. scripts/gpu_check.sh on a bare GPU image) does not
    from pydantic import BaseModel, ConfigDict
except ImportError:  # pragma: no cover - exercised on machines without pydantic
    BaseModel, ConfigDict = object, dict

from benchmarks.common import output, plots
from benchmarks.common.stamp import stamp

NAME = "kernels"
KERNELS = ("key_scores", "paged_decode", "paged_prefill", "gather", "scatter")
RESULTS_DIR = output.RESULTS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {','.join(KERNELS)}")
    p.add_argument("--seq-lens", default="4096,16384,32768", help="KV lengths T (tokens per sequence)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--queries", type=int, default=4096, help="key_scores: reference queries per KV head")
    p.add_argument("--batch", type=int, default=16, help="paged_decode: sequences per decode batch")
    p.add_argument("--chunk", type=int, default=2048, help="paged_prefill: new tokens of the prefill chunk")
    p.add_argument("--block-size", type=int, default=16, help="paged KV block size (vLLM GPU default 16)")
    p.add_argument("--ratio", type=float, default=0.1, help="scatter: compacted length t = ratio * T")
    p.add_argument("--no-ref", action="store_true", help="skip the torch references (time Triton only)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/kernels_<gpu>_<time>.json)")
    p.add_argument("--interpret", action="store_true",
                   help="no GPU: run tiny shapes through TRITON_INTERPRET=1 as a smoke check")
    return p.parse_args(argv)


def unavailable(interpret: bool) -> str | None:
    """Why the benchmark cannot run here, or None."""
    import torch

    if not torch.cuda.is_available() and not interpret:
        return "benchmarks/suites/kernels.py needs a CUDA GPU (none found); use --interpret for a tiny CPU smoke check."
    return None


def _vllm_decode(query, kc, vc, table, cu, lens, scale, T):
    """vLLM's stock Triton decode attention (no β) on the same paged cache, or None if it cannot be imported."""
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception:  # noqa: BLE001 - any import problem means: no comparison on this install
        return None
    out = query.new_empty(query.shape)

    def run():
        unified_attention(q=query, k=kc, v=vc, out=out, cu_seqlens_q=cu, max_seqlen_q=1, seqused_k=lens,
                          max_seqlen_k=T, softmax_scale=scale, causal=True, window_size=(-1, -1),
                          block_table=table, softcap=0, q_descale=None, k_descale=None, v_descale=None)
        return out

    return run


def measure(args) -> tuple[list[dict], dict]:
    """Run the selected kernels; rows and the meta stamp (needs CUDA, or ``args.interpret``)."""
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    import triton

    from vllm_attnmatch import kernels as K

    device = "cpu" if args.interpret else "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    if args.interpret:  # tiny shapes: the interpreter runs every program instance in Python
        args.seq_lens, args.head_dim, args.kv_heads, args.queries = "64,100", 32, 2, 48
        args.batch, args.chunk = 3, 24
    seq_lens = [int(x) for x in args.seq_lens.split(",") if x]
    selected = [k for k in args.kernels.split(",") if k]
    unknown = set(selected) - set(KERNELS)
    if unknown:
        raise SystemExit(f"unknown kernels {sorted(unknown)}; choose from {KERNELS}")
    H, G, d, bs = args.kv_heads, args.group, args.head_dim, args.block_size
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    def bench(fn):
        if args.interpret:
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    def maxdiff(a, b):
        return float((a.float() - b.float()).abs().nan_to_num(posinf=0.0, neginf=0.0).max()) if a.numel() else 0.0

    def paged_caches(total_tokens_per_seq, num_seqs, beta_frac=0.1):
        """Caches holding ``num_seqs`` sequences of T tokens in shuffled blocks; ~10 % compacted slots (β),
        a few -inf padding slots."""
        nblk = triton.cdiv(total_tokens_per_seq, bs)
        num_blocks = nblk * num_seqs + 8
        kc, vc = randn(num_blocks, bs, H, d), randn(num_blocks, bs, H, d)
        bias = torch.zeros(num_blocks, bs, H, device=device)
        n_beta = int(beta_frac * num_blocks)
        bias[:n_beta] = randn(n_beta, bs, H, dt=torch.float32)
        bias[:n_beta, -1] = float("-inf")
        perm = torch.randperm(num_blocks, device=device, generator=gen).int()
        table = perm[: nblk * num_seqs].reshape(num_seqs, nblk).contiguous()
        return kc, vc, bias, table

    def run_case(kernel, T, extra, tri, ref, compare, foreign=False):
        """``foreign``: the case calls vLLM internals; any error is recorded in the row, not raised."""
        row = dict(kernel=kernel, T=T, **extra)
        try:
            out_t = tri()
            row["triton_ms"] = bench(tri)
            if not args.no_ref:
                out_r = ref()
                row["torch_ms"] = bench(ref)
                row["speedup"] = row["torch_ms"] / row["triton_ms"]
                row["max_abs_diff"] = compare(out_t, out_r)
        except torch.OutOfMemoryError as e:  # the dense reference is the usual victim at 32k
            row["error"] = f"OOM: {str(e).splitlines()[0]}"
            torch.cuda.empty_cache()
        except Exception as e:
            if not foreign:
                raise
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        rows.append(row)
        t_ms = f"{row['triton_ms']:.3f}" if "triton_ms" in row else "-"
        r_ms = f"{row['torch_ms']:.3f}" if "torch_ms" in row else "-"
        extra_s = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"{kernel:14s} T={T:<6d} {extra_s:28s} triton {t_ms:>9s} ms  torch {r_ms:>9s} ms  "
              f"speedup {row.get('speedup', float('nan')):6.2f}  maxdiff {row.get('max_abs_diff', float('nan')):.2e}"
              + (f"  {row['error']}" if "error" in row else ""), flush=True)

    rows: list[dict] = []
    scale = d ** -0.5
    for T in seq_lens:
        if "key_scores" in selected:
            n = args.queries
            q, k = randn(H, n, d), randn(H, T, d)
            bias = randn(H, T, dt=torch.float32)
            qpos = torch.sort(torch.randint(0, T, (n,), device=device, generator=gen)).values
            kpos = torch.arange(T, device=device)
            run_case("key_scores", T, {"n": n, "causal": True},
                     lambda: K.key_scores_triton(q, k, scale, bias, qpos, kpos),
                     lambda: K.key_scores_ref(q, k, scale, bias, qpos, kpos),
                     lambda a, b: max(maxdiff(x, y) for x, y in zip(a, b)))
            del q, k, bias
        if "paged_decode" in selected:
            B = args.batch
            kc, vc, bias, table = paged_caches(T, B)
            query = randn(B, H * G, d)
            cu = torch.arange(B + 1, device=device, dtype=torch.int32)
            lens = torch.full((B,), T, device=device, dtype=torch.int32)
            for splits in (1, None):  # one program per (sequence, KV head) vs the automatic split-KV factor
                run_case("paged_decode", T, {"batch": B, "splits": splits or "auto"},
                         lambda: K.paged_attention_bias_triton(query, kc, vc, bias, table, cu, lens, scale,
                                                               max_seqlen_q=1, max_seqlen_k=T, num_splits=splits),
                         lambda: K.paged_attention_bias_ref(query, kc, vc, bias, table, cu, lens, scale),
                         maxdiff)
            stock = None if args.interpret else _vllm_decode(query, kc, vc, table, cu, lens, scale, T)
            if stock is not None:  # same KV length, no β: triton_ms = vLLM's kernel, torch_ms = ours with β
                zero = torch.zeros_like(bias)
                run_case("vllm_decode", T, {"batch": B, "vs": "attnmatch β kernel"}, stock,
                         lambda: K.paged_attention_bias_triton(query, kc, vc, bias, table, cu, lens, scale,
                                                               max_seqlen_q=1, max_seqlen_k=T),
                         lambda a, b: maxdiff(a, K.paged_attention_bias_ref(query, kc, vc, zero, table, cu, lens, scale)),
                         foreign=True)
            del kc, vc, bias, table
        if "paged_prefill" in selected:
            c = min(args.chunk, T)
            kc, vc, bias, table = paged_caches(T, 1)
            query = randn(c, H * G, d)
            cu = torch.tensor([0, c], device=device, dtype=torch.int32)
            lens = torch.tensor([T], device=device, dtype=torch.int32)
            run_case("paged_prefill", T, {"chunk": c},
                     lambda: K.paged_attention_bias_triton(query, kc, vc, bias, table, cu, lens, scale, max_seqlen_q=c),
                     lambda: K.paged_attention_bias_ref(query, kc, vc, bias, table, cu, lens, scale),
                     maxdiff)
            del kc, vc, bias, table
        if "gather" in selected or "scatter" in selected:
            kc, vc, bias, table = paged_caches(T, 1)
            ids = table[0]
            if "gather" in selected:
                run_case("gather", T, {},
                         lambda: K.gather_paged_kv_triton(kc, vc, ids, T, bias),
                         lambda: K.gather_paged_kv_ref(kc, vc, ids, T, bias),
                         lambda a, b: max(maxdiff(x, y) for x, y in zip(a, b)))
            if "scatter" in selected:
                t = max(1, int(args.ratio * T))
                keys, values = randn(H, t, d, dt=torch.float32), randn(H, t, d, dt=torch.float32)
                beta = randn(H, t, dt=torch.float32)
                dst = ids[: triton.cdiv(t, bs)]
                caches_t = (kc.clone(), vc.clone(), bias.clone())
                caches_r = (kc.clone(), vc.clone(), bias.clone())

                def _tri():
                    K.scatter_paged_kv_triton(keys, values, beta, *caches_t, dst)
                    return caches_t

                def _ref():
                    K.scatter_paged_kv_ref(keys, values, beta, *caches_r, dst)
                    return caches_r

                run_case("scatter", T, {"t": t},
                         _tri, _ref, lambda a, b: max(maxdiff(x, y) for x, y in zip(a, b)))
            del kc, vc, bias, table

    gpu = "interpreter" if args.interpret else torch.cuda.get_device_name()
    meta = stamp()
    meta["machine"].update(device=gpu, interpret=bool(args.interpret))
    meta["versions"]["cuda"] = torch.version.cuda
    meta.update(
        shapes={"dtype": args.dtype, "head_dim": d, "kv_heads": H, "group": G, "block_size": bs, "queries": args.queries,
                    "batch": args.batch, "chunk": args.chunk, "ratio": args.ratio},
        timing="triton.testing.do_bench median ms (warmup 25 ms, rep 100 ms)" if not args.interpret
        else "interpreter, one call, not a performance number",
    )
    return rows, meta


def main(argv=None) -> int:
    args = parse_args(argv)
    reason = unavailable(args.interpret)
    if reason:
        print(reason)
        return 0
    rows, meta = measure(args)
    if args.interpret and not args.out:
        print("interpreter smoke check done (nothing written; pass --out to keep the JSON)")
        return 0 if all("error" not in r for r in rows) else 1
    gpu = meta["machine"]["device"]
    out = Path(args.out) if args.out else RESULTS_DIR / (
        "kernels_" + "".join(ch if ch.isalnum() else "-" for ch in gpu).strip("-").lower()
        + "_" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + ".json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


# -- suite form (python -m benchmarks run --suite kernels) ---------------------------------------------------
class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kernels: list[str] = list(KERNELS)
    seq_lens: list[int] = [4096, 16384, 32768]
    dtype: str = "bf16"
    interpret: bool = False  # set from TRITON_INTERPRET=1 when there is no GPU


QUICK = {"seq_lens": [4096]}


class Skipped(Exception):
    """The suite cannot run on this machine (the message says why)."""


def steps(cfg: Config) -> int:
    return 1


def run(cfg: Config, endpoint, run_id: str, progress) -> dict:
    interpret = cfg.interpret or os.environ.get("TRITON_INTERPRET") == "1"
    reason = unavailable(interpret)
    if reason:
        raise Skipped("kernels suite skipped: no CUDA GPU (set TRITON_INTERPRET=1 for a tiny CPU smoke check)")
    argv = ["--kernels", ",".join(cfg.kernels), "--seq-lens", ",".join(map(str, cfg.seq_lens)), "--dtype", cfg.dtype]
    rows, meta = measure(parse_args(argv + (["--interpret"] if interpret else [])))
    progress.update()
    return {"device": meta["machine"]["device"], "shapes": meta["shapes"], "timing": meta["timing"], "results": rows}


def markdown(result: dict) -> str:
    from benchmarks.common.stamp import describe

    body = [[r["kernel"], r["T"], " ".join(f"{k}={r[k]}" for k in ("n", "batch", "splits", "chunk", "t") if k in r),
             output.fmt(r.get("triton_ms"), ".3f"), output.fmt(r.get("torch_ms"), ".3f"), output.fmt(r.get("speedup"), ".2f"),
             output.fmt(r.get("max_abs_diff"), ".1e"), r.get("error", "")] for r in result["results"]]
    return "\n".join([
        f"# Triton kernels vs torch references on {result['device']}", "",
        f"`{result['meta']['command']}`  ", describe(result["meta"]), "",
        (f"Shapes: `{json.dumps(result['shapes'])}`; {result['timing']}. Row `vllm_decode`: the first time column "
        "is vLLM's own decode kernel (no β), the second this plugin's β-aware kernel at the same KV length."), "",
        *output.table(["kernel", "T", "shape", "triton ms", "reference ms", "speedup", "max abs diff", "error"], body),
    ])


plot = plots.kernels


if __name__ == "__main__":
    sys.exit(main())
