"""What counts as running out of memory, on every device.

CUDA raises ``torch.OutOfMemoryError``; a failed CPU allocation raises a plain ``RuntimeError``
("DefaultCPUAllocator: can't allocate memory") or Python's ``MemoryError``. The plugin's guards (the
reference-query capture inside the attention forward, the compaction of a layer) treat them alike: the
request is served uncompacted instead of the step failing. No vLLM import.
"""

from __future__ import annotations

import torch

_CPU_ALLOCATION_FAILURE = "can't allocate memory"


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and _CPU_ALLOCATION_FAILURE in str(exc)
