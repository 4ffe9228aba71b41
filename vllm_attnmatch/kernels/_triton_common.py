"""Small Triton helpers shared by the kernels of this package (imports triton: load lazily)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreting(kernel=None) -> bool:
    """Whether ``kernel`` (a decorated Triton function) runs in Triton's CPU interpreter.

    Triton decides at decoration time (``TRITON_INTERPRET=1`` makes ``@triton.jit`` return an
    ``InterpretedFunction``), so the kernel object is the truth; without one, the environment is consulted.
    """
    if kernel is not None:
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # pragma: no cover - layout of older/newer triton
            return type(kernel).__name__ == "InterpretedFunction"
        return isinstance(kernel, InterpretedFunction)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_config(dtype: torch.dtype, allow_tf32: bool, kernel=None) -> dict:
    """Constexprs for :func:`dot` when launching ``kernel``: the dot precision and whether to upcast to fp32.

    Triton 3.9's interpreter returns garbage for bf16 ``tl.dot`` (verified: errors ~1e10 on 16×16 inputs), so
    under the interpreter bf16 operands are upcast to fp32 — exact, and the same maths as the GPU path
    (bf16 products accumulated in fp32). On GPU bf16/fp16 go to the tensor cores untouched.
    """
    upcast = interpreting(kernel) and dtype == torch.bfloat16
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
