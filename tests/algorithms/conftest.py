"""The bundled model, its tokenizer and a real text, shared by the model-level algorithm tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vllm_attnmatch.algorithms.reference_llama import ReferenceLlama

TEXT = Path("/usr/share/common-licenses/GPL-3")


@dataclass
class Bundled:
    folder: Path
    model: ReferenceLlama
    tokenizer: object
    ids: list[int]  # GPL-3, tokenized


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread():
    """One intra-op thread: on a shared 2-core box two spinning OpenMP threads ran the small compactions
    of these tests 10-40x slower under load (measured: 2.5 s vs 0.06 s per compaction at load 12)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _devices():
    """cpu always; cuda when one is present (scripts/gpu_check.sh runs these tests on a GPU)."""
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


#: What the engine hands the algorithms: K/V in the model dtype. fp32 is the CPU default, bf16 the GPU
#: default (and CPU bf16 servers), fp16 the other GPU dtype.
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=MODEL_DTYPES, ids=lambda dt: str(dt).removeprefix("torch."))
def model_dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(scope="session")
def bundled():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from vllm_attnmatch.model import ensure_model

    # One thread: on a shared 2-core box two spinning OpenMP threads ran these tests ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = ensure_model()
    except Exception as exc:  # noqa: BLE001 - e.g. the GPU check machine: a repo copy, no model, no network
        pytest.skip(f"the bundled model is not available here: {type(exc).__name__}: {exc}")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    yield Bundled(folder, ReferenceLlama.from_pretrained(folder), tokenizer, tokenizer(TEXT.read_text())["input_ids"])
    torch.set_num_threads(threads)
