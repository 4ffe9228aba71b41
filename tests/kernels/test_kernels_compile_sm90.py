"""Every kernel compiles to a CUDA binary for sm_90 (H100) at realistic tile sizes, without a GPU.

The interpreter tests check the maths but not that the kernels lower through Triton's GPU compiler (types of
loop-carried values, dot shapes, shared-memory size). This runs ``triton.compile`` ahead of time against a
GPUTarget (ptxas ships in the triton wheel) in a subprocess, because conftest turns on the interpreter for this
process. It cannot check speed or numerics on a GPU.
"""

import os
import subprocess
import sys
import time

import pytest

SKIP_RC = 3  # the subprocess' exit status for "this environment cannot compile for CUDA"

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _compile(fn, types, constexprs, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else types.get(name, "i32")) for name in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32))


def compile_all():
    """Compile each kernel for fp32 and bf16 at its default (GPU) tile sizes; print one line per kernel."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends

        if "nvidia" not in backends:
            print("SKIP: triton has no nvidia backend")
            sys.exit(SKIP_RC)
    except ImportError as e:
        print(f"SKIP: {e}")
        sys.exit(SKIP_RC)
    from vllm_attnmatch.kernels import key_scores as ks
    from vllm_attnmatch.kernels import paged_attention_bias as pa
    from vllm_attnmatch.kernels import paged_gather_scatter as gs

    for dt in ("bf16", "fp32"):
        dot = dict(DOT_PRECISION="ieee", DOT_UPCAST=False)
        common = dict(HAS_BIAS=True, CAUSAL=True, BLOCK_N=64, BLOCK_T=64, BLOCK_D=128, **dot)
        ks_types = {"q_ptr": PTR[dt], "k_ptr": PTR[dt], "bias_ptr": "*fp32", "qpos_ptr": "*i64", "kpos_ptr": "*i64",
                    "lse_ptr": "*fp32", "max_ptr": "*fp32", "mean_ptr": "*fp32", "rms_ptr": "*fp32",
                    "scale": "fp32", "inv_n": "fp32"}
        jobs = [
            ("key_scores/_query_lse_kernel", ks._query_lse_kernel, ks_types, common),
            ("key_scores/_key_stats_kernel", ks._key_stats_kernel, ks_types, common),
        ]
        pa_types = {"out_ptr": PTR[dt], "q_ptr": PTR[dt], "k_cache_ptr": PTR[dt], "v_cache_ptr": PTR[dt],
                    "bias_ptr": "*fp32", "block_table_ptr": "*i32", "cu_seqlens_q_ptr": "*i32",
                    "seq_lens_ptr": "*i32", "scale": "fp32"}
        pa_types.update(part_acc_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32")
        for block_m, splits in ((16, 8), (64, 1)):  # split-KV decode and prefill tile shapes, G = 4
            jobs.append((f"paged_attention_bias BLOCK_M={block_m} NUM_SPLITS={splits}",
                         pa._paged_attention_bias_kernel, pa_types,
                         dict(NUM_QUERIES_PER_KV=4, BLOCK_SIZE=16, BLOCK_Q=block_m // 4, BLOCK_M=block_m, TILE=32,
                              BLOCK_D=128, HAS_BIAS=True, NUM_SPLITS=splits, **dot)))
        jobs.append(("paged_attention_bias/_merge_splits_kernel", pa._merge_splits_kernel,
                     dict(out_ptr=PTR[dt], part_acc_ptr="*fp32", part_m_ptr="*fp32", part_l_ptr="*fp32"),
                     dict(NUM_SPLITS=8, BLOCK_S=8, BLOCK_D=128)))
        gs_types = {"k_cache_ptr": PTR[dt], "v_cache_ptr": PTR[dt], "bias_cache_ptr": "*fp32", "block_ids_ptr": "*i32",
                    "k_out_ptr": PTR[dt], "v_out_ptr": PTR[dt], "bias_out_ptr": "*fp32",
                    "k_ptr": "*fp32", "v_ptr": "*fp32", "beta_ptr": "*fp32"}
        jobs.append(("paged_gather_scatter/_gather_kernel", gs._gather_kernel, gs_types,
                     dict(BLOCK_SIZE=16, BLOCK_T=64, BLOCK_D=128, HAS_BIAS=True)))
        jobs.append(("paged_gather_scatter/_scatter_kernel", gs._scatter_kernel, gs_types,
                     dict(BLOCK_SIZE=16, BLOCK_T=64, BLOCK_D=128, HAS_BIAS=True, HAS_BETA=True)))
        for name, fn, types, cx in jobs:
            t0 = time.time()
            k = _compile(fn, types, cx)
            print(f"{dt} {name}: ok ({time.time() - t0:.1f}s, {k.metadata.num_warps} warps, "
                  f"{k.metadata.shared} B shared)")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    if r.returncode == SKIP_RC:
        pytest.skip(r.stdout.strip())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count(": ok") == 14, r.stdout


if __name__ == "__main__":
    compile_all()
