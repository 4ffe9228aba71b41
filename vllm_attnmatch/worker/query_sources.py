"""Synthetic reference queries over a request's own KV: ``repeat`` and ``self_study`` (``am_queries``).

Why: the context's own prefill queries (``context``) see the document causally and from close by; the
queries of tokens that come *after* the document — the model re-reading it, or answering questions about
it — look at the whole document the way the continuation will. The paper gets them by teacher-forcing a
"repeat the previous context" prompt plus the context (``repeat``) or by letting the model generate short
tasks about the context (``self_study``). Here both run on the worker with an independent torch forward of
the served Llama weights (:class:`ReferenceLlama`) over the request's gathered KV, so nothing is emitted to
the client and the scheduler is not involved. Their positions are logical and after the span, so causal
targets treat them as queries that see all of it.

No vLLM import: the runner passes the gathered cache, the token ids and a tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama

REPEAT_PROMPT = "\nRepeat the previous context verbatim.\n"
SELF_STUDY_PROMPTS = (
    "\nSummarize the text above in a few sentences.\n",
    "\nList the key facts stated in the text above.\n",
    "\nWrite three questions that the text above answers, with their answers.\n",
)


@dataclass(frozen=True)
class QuerySourceSettings:
    """Bounds of the synthetic sources (server settings ``repeat_max_tokens``, ``self_study_*``)."""

    repeat_max_tokens: int = 2048
    self_study_prompts: tuple[str, ...] = SELF_STUDY_PROMPTS
    self_study_tokens: int = 48  # generated tokens per prompt
    self_study_seconds: float = 30.0  # wall-clock bound of all prompts together


@dataclass
class SyntheticQueries:
    """Per layer ``(n, H_q, d)`` post-RoPE queries, their logical positions ``(n,)``, and what it cost."""

    queries: list[torch.Tensor]
    positions: torch.Tensor
    seconds: float
    tokens: int
    info: dict = field(default_factory=dict)


def _concat(parts: list[tuple[list[torch.Tensor], torch.Tensor]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    num_layers = len(parts[0][0])
    queries = [torch.cat([p[0][i] for p in parts]) for i in range(num_layers)]
    return queries, torch.cat([p[1] for p in parts])


def repeat_queries(
    model: ReferenceLlama, cache: list[LayerKV], context_ids: list[int], prompt_ids: list[int], max_tokens: int
) -> SyntheticQueries:
    """Teacher-force ``prompt + context`` after the context; queries of the repeated copy."""
    started = time.perf_counter()
    start = len(context_ids)
    repeated = list(context_ids[:max_tokens])
    work = [kv.clone() for kv in cache]
    _, queries = model.forward(list(prompt_ids) + repeated, work, start, return_queries=True)
    skip = len(prompt_ids)
    positions = torch.arange(start + skip, start + skip + len(repeated))
    return SyntheticQueries(
        [q[skip:] for q in queries], positions, time.perf_counter() - started, len(prompt_ids) + len(repeated)
    )


def self_study_queries(
    model: ReferenceLlama,
    cache: list[LayerKV],
    context_len: int,
    prompts_ids: list[list[int]],
    max_new_tokens: int,
    max_seconds: float,
) -> SyntheticQueries:
    """Greedy-generate a short answer to each prompt over the context; queries of prompt and answer."""
    started = time.perf_counter()
    parts: list[tuple[list[torch.Tensor], torch.Tensor]] = []
    generated: list[list[int]] = []
    tokens = 0
    for prompt in prompts_ids:
        if time.perf_counter() - started > max_seconds:
            break
        work = [kv.clone() for kv in cache]
        position = context_len
        logits, queries = model.forward(prompt, work, position, return_queries=True)
        parts.append((queries, torch.arange(position, position + len(prompt))))
        position += len(prompt)
        answer: list[int] = []
        for _ in range(max_new_tokens):
            if time.perf_counter() - started > max_seconds:
                break
            token = int(logits[-1].argmax())
            answer.append(token)
            logits, queries = model.forward([token], work, position, return_queries=True)
            parts.append((queries, torch.tensor([position])))
            position += 1
        tokens += len(prompt) + len(answer)
        generated.append(answer)
    if not parts:
        raise TimeoutError("self_study produced no queries within its time bound")
    queries, positions = _concat(parts)
    return SyntheticQueries(queries, positions, time.perf_counter() - started, tokens, {"answers": generated})


def cap_rows(queries: dict[str, torch.Tensor], positions: torch.Tensor | None, cap: int):
    """Keep at most ``cap`` rows, evenly spread over the request (``query_mix``'s per-source cap)."""
    if positions is None or positions.numel() <= cap:
        return queries, positions
    keep = torch.linspace(0, positions.numel() - 1, cap).round().long() if cap else positions[:0].long()
    return {name: q[keep] for name, q in queries.items()}, positions[keep]
