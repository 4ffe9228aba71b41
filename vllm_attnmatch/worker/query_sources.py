"""Synthetic reference queries over a request's own KV: ``repeat`` and ``self_study`` (``am_queries``).

Why: the context's own prefill queries (``context``) see the document causally and from close by; the
queries of tokens that come *after* the document — the model re-reading it, or answering questions about
it — look at the whole document the way the continuation will. The paper gets them by teacher-forcing a
"repeat the previous context" prompt plus the context (``repeat``) or by letting the model generate short
tasks about the context (``self_study``). Here both run on the worker with an independent torch forward of
the served Llama weights (:class:`ReferenceLlama`) over the request's gathered KV, so nothing is emitted to
the client and the scheduler is not involved. Their positions are logical and after the span, so causal
targets treat them as queries that see all of it. ``self_study`` decodes all its prompts as one batch
(:func:`self_study_batched`; :func:`self_study_queries` is the one-prompt-at-a-time reference), with a
prompt family that suits continuing the text (:data:`PROMPT_FAMILIES`; ``continue`` won on the DEV texts:
``python -m benchmarks query-sources --offline --texts dev``).

No vLLM import: the runner passes the gathered cache, the token ids and a tokenizer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vllm_attnmatch.algorithms.kvzip import reconstruction_scores_from_lse
from vllm_attnmatch.algorithms.words import word_max
from vllm_attnmatch.algorithms.queries import group_queries
from vllm_attnmatch.algorithms.reference_llama import LayerKV, PrefixBatch, ReferenceLlama

REPEAT_PROMPT = "\nRepeat the previous context verbatim.\n"
SELF_STUDY_PROMPTS = (
    "\nSummarize the text above in a few sentences.\n",
    "\nList the key facts stated in the text above.\n",
    "\nWrite three questions that the text above answers, with their answers.\n",
)
#: Special self-study prompts, resolved against the context's token ids (:func:`build_prompts`).
CONTINUE = "<continue>"  # the text itself, continued from its last token (re-fed, its cached copy hidden)
RECALL = "<recall:{:.2f}>"  # restart the text at this fraction of it (16 tokens teacher-forced), continue
RECALL_TOKENS = 16
#: Self-study prompt families (server setting ``self_study_prompts``). Why several: a summary or a quiz
#: looks at a document the way a question does; a continuation looks at it the way the next part of the
#: same text does (source code, logs and help pages are continued, not summarised).
PROMPT_FAMILIES: dict[str, tuple[str, ...]] = {
    "tasks": SELF_STUDY_PROMPTS,
    "continue": (CONTINUE, RECALL.format(1 / 3), RECALL.format(2 / 3)),
    "mixed": (CONTINUE, RECALL.format(0.5), SELF_STUDY_PROMPTS[0], SELF_STUDY_PROMPTS[2]),
}


@dataclass(frozen=True)
class Prompt:
    """One self-study row: token ids fed after the context at ``start``; ``hide`` hides the context's last
    ``hide`` cached entries from it (the continuation row re-feeds them)."""

    ids: tuple[int, ...]
    start: int
    hide: int = 0


def build_prompts(family: str | tuple[str, ...], encode, context_ids: list[int]) -> list[Prompt]:
    """Token-level prompts of a family (a name in :data:`PROMPT_FAMILIES`, or the prompt strings)."""
    specs = PROMPT_FAMILIES[family] if isinstance(family, str) else family
    T = len(context_ids)
    prompts = []
    for spec in specs:
        if spec == CONTINUE:
            prompts.append(Prompt((context_ids[-1],), T - 1, hide=1))
        elif spec.startswith("<recall:"):
            at = int(float(spec[len("<recall:"):-1]) * T)
            prompts.append(Prompt(tuple(encode("\n\n") + context_ids[at : at + RECALL_TOKENS]), T))
        else:
            prompts.append(Prompt(tuple(encode(spec)), T))
    return prompts


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


class RepeatPass:
    """Repeat-prefill one layer at a time: teacher-force ``prompt + context`` after the context.

    Why a pass and not one call: re-reading a document costs about a prefill of it. Served, each
    ``next_layer`` runs in the engine step that compacts that layer, so the re-read spreads over the
    job's layer slices instead of freezing the batch for its whole duration. :func:`repeat_queries` runs
    it through at once.

    ``past(i)`` returns layer ``i``'s cache of the context (read when the pass reaches it). With
    ``key_scores``, each layer also gives KVzip's reconstruction score of every context key (``(H_kv,
    len(context))``): the largest attention a query of the copy gives it, normalised over everything that
    query sees (:func:`~vllm_attnmatch.algorithms.kvzip.reconstruction_scores`). Only here is the whole
    repeated sequence at hand, so the score is computed here and not in the fit.
    """

    def __init__(self, model: ReferenceLlama, past, context_ids: list[int], prompt_ids: list[int], max_tokens: int,
                 key_scores: bool = False, words: torch.Tensor | None = None) -> None:
        self.start = len(context_ids)
        repeated = list(context_ids[:max_tokens])
        self.skip = len(prompt_ids)
        self.positions = torch.arange(self.start + self.skip, self.start + self.skip + len(repeated))
        self.tokens = self.skip + len(repeated)
        self.key_scores = key_scores
        self.words = words  # (len(context),) word ids: scores by whole words (algorithms.words)
        self.seconds = 0.0
        self._model = model
        self._layers = model.layer_by_layer(list(prompt_ids) + repeated, past, self.start, want_lse=key_scores)

    def next_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The next layer's queries of the repeated copy ``(n, H_q, d)`` and, if asked, its key scores."""
        started = time.perf_counter()
        scores = None
        if self.key_scores:
            kv, q, lse = next(self._layers)
            m = self._model
            H = m.num_kv_heads
            # lse (H_q, n) -> (H_kv, G·n): query head j·G + g's rows, in group_queries' order
            rows = lse[:, self.skip:].reshape(H, -1)
            scores = reconstruction_scores_from_lse(group_queries(q[self.skip:], H)[0], kv.keys[:, :self.start],
                                                    rows, m.scale)
            if self.words is not None:
                scores = word_max(scores, self.words)
        else:
            kv, q = next(self._layers)
        self.seconds += time.perf_counter() - started
        return q[self.skip:], scores


def repeat_queries(
    model: ReferenceLlama, cache: list[LayerKV], context_ids: list[int], prompt_ids: list[int], max_tokens: int,
    key_scores: bool = False,
) -> SyntheticQueries:
    """:class:`RepeatPass` through every layer at once; key scores (if asked) in ``info["key_scores"]``."""
    run = RepeatPass(model, cache.__getitem__, context_ids, prompt_ids, max_tokens, key_scores)
    layers = [run.next_layer() for _ in range(model.num_layers)]
    info = {"key_scores": [scores for _, scores in layers]} if key_scores else {}
    return SyntheticQueries([q for q, _ in layers], run.positions, run.seconds, run.tokens, info)


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


def self_study_batched(
    model: ReferenceLlama,
    cache: list[LayerKV],
    prompts: list[Prompt],
    max_new_tokens: int,
    max_seconds: float,
) -> SyntheticQueries:
    """All prompts at once: greedy answers decoded as one batch over the shared context cache.

    Same queries as :func:`self_study_queries` (prompt tokens, then every generated token as it is fed),
    in the same order (row by row), for the cost of one batched step per generated token
    (:class:`PrefixBatch`: a preallocated cache, one fused attention call per layer). ``info["rows"]``
    holds each row's fed tokens and positions, for a later teacher-forced pass (on-policy).
    """
    started = time.perf_counter()
    B = len(prompts)
    if B == 0:
        raise ValueError("self_study needs at least one prompt")
    P = max(len(p.ids) for p in prompts)
    batch = PrefixBatch(model, cache, B, P + max_new_tokens, hide=[p.hide for p in prompts])
    pads = [P - len(p.ids) for p in prompts]
    tokens = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    positions = torch.zeros(B, P, dtype=torch.long)
    for b, (p, pad) in enumerate(zip(prompts, pads)):
        tokens[b, pad:] = torch.tensor(p.ids)
        valid[b, pad:] = True
        positions[b] = (torch.arange(P) - pad).clamp_min(0) + p.start
    logits, queries = batch.step(tokens, positions, valid, logits=max_new_tokens > 0)
    steps = [queries]  # each (B, n, H_q, d) per layer
    next_pos = torch.tensor([p.start + len(p.ids) for p in prompts])
    answers = torch.zeros(B, 0, dtype=torch.long)
    for i in range(max_new_tokens):
        if time.perf_counter() - started > max_seconds:
            break
        token = logits.argmax(-1)
        answers = torch.cat([answers, token[:, None]], 1)
        last = i == max_new_tokens - 1
        logits, queries = batch.step(token[:, None], (next_pos + i)[:, None], logits=not last)
        steps.append(queries)
    N = answers.shape[1]
    layers = []
    for layer in range(model.num_layers):
        prompt_q = steps[0][layer]
        answer_q = torch.cat([s[layer] for s in steps[1:]], 1) if N else prompt_q[:, :0]
        layers.append(torch.cat([torch.cat([prompt_q[b, pads[b]:], answer_q[b]]) for b in range(B)]))
    rows, pos = [], []
    for b, p in enumerate(prompts):
        ids = list(p.ids) + answers[b].tolist()
        row_pos = torch.arange(p.start, p.start + len(ids))
        rows.append((ids, row_pos, p.hide))
        pos.append(row_pos)
    return SyntheticQueries(layers, torch.cat(pos), time.perf_counter() - started, sum(len(r[0]) for r in rows),
                            {"answers": answers.tolist(), "rows": rows})


def cap_rows(queries: dict[str, torch.Tensor], positions: torch.Tensor | None, cap: int):
    """Keep at most ``cap`` rows, evenly spread over the request (``query_mix``'s per-source cap)."""
    if positions is None or positions.numel() <= cap:
        return queries, positions
    keep = torch.linspace(0, positions.numel() - 1, cap).round().long() if cap else positions[:0].long()
    return {name: q[keep] for name, q in queries.items()}, positions[keep]
