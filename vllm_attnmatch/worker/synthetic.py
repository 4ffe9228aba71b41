"""Worker glue for the synthetic reference-query sources: builds the torch reference forward and the
tokenizer once, gathers a request's prefix KV from the paged cache, and runs ``repeat`` or ``self_study``
(see :mod:`query_sources`) over it.

Why a separate forward and not vLLM's: these tokens must not be scheduled, sampled, streamed or counted as
the request's; a plain torch forward of the same weights over the gathered cache does exactly that. It
costs a copy of the weights (loaded from the served checkpoint on first use; the projections stored
column-major in bf16 for fast few-row decoding, ``ReferenceLlama.for_decoding``: ~1.4x faster than fp32
here, queries within ~0.5 % and the same greedy answers on GPL-3) and supports Llama-style checkpoints; anything
else falls back to context queries with a warning. ``self_study`` decodes all its prompts as one batch
(``query_sources.self_study_batched``); the prompts are the family named by the server setting
``self_study_prompts`` (``query_sources.PROMPT_FAMILIES``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama
from vllm_attnmatch.worker.executor import layer_index
from vllm_attnmatch.worker.query_sources import (
    PROMPT_FAMILIES,
    REPEAT_PROMPT,
    build_prompts,
    repeat_queries,
    self_study_batched,
)


@dataclass
class ExtraQueries:
    """Synthetic queries for one job: layer name -> ``(n, H_q, d)``, logical positions ``(n,)``, seconds."""

    queries: dict[str, torch.Tensor]
    positions: torch.Tensor
    seconds: float


class SyntheticQueryProducer:
    def __init__(self, model: ReferenceLlama, tokenizer, settings) -> None:
        self.model = model
        self.settings = settings
        self.encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.repeat_prompt = self.encode(REPEAT_PROMPT)
        self.family = getattr(settings, "self_study_prompts", "tasks")
        if self.family not in PROMPT_FAMILIES:
            raise ValueError(f"self_study_prompts: unknown family {self.family!r} (one of {', '.join(PROMPT_FAMILIES)})")

    @classmethod
    def for_model(cls, model_config, settings) -> SyntheticQueryProducer:
        from transformers import AutoTokenizer

        model = ReferenceLlama.from_pretrained(model_config.model).for_decoding(torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer)
        return cls(model, tokenizer, settings)

    def produce(self, job, kv, prompt_ids: list[int]) -> ExtraQueries:
        end = job.layout.span_end
        names = sorted(kv.layer_names(), key=layer_index)
        if len(names) != self.model.num_layers:
            raise ValueError(f"{len(names)} attention layers in the engine, {self.model.num_layers} in the checkpoint")
        cache, device = [], None
        for name in names:
            keys, values = kv.gather(name, job.src_block_ids, end)
            device = keys.device  # the reference forward runs on the CPU copy of the weights
            keys, values = keys.float().cpu(), values.float().cpu()
            cache.append(LayerKV(keys, values, torch.zeros(keys.shape[:2])))
        context = prompt_ids[:end]
        if job.queries == "repeat":
            made = repeat_queries(self.model, cache, context, self.repeat_prompt, self.settings.repeat_max_tokens)
        elif job.queries == "self_study":
            prompts = build_prompts(self.family, self.encode, context)
            made = self_study_batched(
                self.model, cache, prompts, self.settings.self_study_tokens, self.settings.self_study_seconds
            )
        else:
            raise ValueError(f"unknown query source {job.queries!r}")
        return ExtraQueries(
            {name: q.to(device) for name, q in zip(names, made.queries)}, made.positions, made.seconds
        )
