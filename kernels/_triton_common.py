"""Small Triton helpers shared by the kernels of this package (imports triton: load lazily)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_config(dtype: torch.dtype, allow_tf32: bool) -> dict:
    """Constexprs for :func:`dot`: the dot precision and whether to upcast operands to fp32 first.

    Triton 3.9's interpreter returns garbage for bf16 ``tl.dot`` (verified: errors ~1e10 on 16×16 inputs), so
    under the interpreter bf16 operands are upcast to fp32 — exact, and the same maths as the GPU path
    (bf16 products accumulated in fp32). On GPU bf16/fp16 go to the tensor cores untouched.
    """
    upcast = interpreting() and dtype == torch.bfloat16
    return dict(
        DOT_PRECISION="tf32" if (dtype == torch.float32 and allow_tf32 and not upcast) else "ieee",
        DOT_UPCAST=upcast,
    )


@triton.jit
def dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)
