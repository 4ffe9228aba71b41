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


@pytest.fixture(scope="session")
def bundled():
    from transformers import AutoTokenizer

    from vllm_attnmatch.model import ensure_model

    # One thread: on a shared 2-core box two spinning OpenMP threads ran these tests ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = ensure_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    yield Bundled(folder, ReferenceLlama.from_pretrained(folder), tokenizer, tokenizer(TEXT.read_text())["input_ids"])
    torch.set_num_threads(threads)
