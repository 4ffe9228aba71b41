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

import time
from dataclasses import dataclass, field

import torch

from vllm_attnmatch.algorithms.highest_attention import RECONSTRUCTION
from vllm_attnmatch.algorithms.on_policy import on_policy_pass
from vllm_attnmatch.algorithms.reference_llama import LayerKV, ReferenceLlama
from vllm_attnmatch.algorithms.words import TokenPieces, word_ids
from vllm_attnmatch.worker.executor import compact_layer, layer_index
from vllm_attnmatch.worker.query_sources import (
    PROMPT_FAMILIES,
    REPEAT_PROMPT,
    RepeatPass,
    build_prompts,
    self_study_batched,
)


@dataclass
class ExtraQueries:
    """Synthetic queries for one job: layer name -> ``(n, H_q, d)``, logical positions ``(n,)``, seconds."""

    queries: dict[str, torch.Tensor]
    positions: torch.Tensor
    seconds: float
    key_scores: dict[str, torch.Tensor] | None = None  # layer name -> (H_kv, span end): KVzip scores, if asked

    @property
    def query_seconds(self) -> float:
        """Of :attr:`seconds`, producing reference queries: all of it."""
        return self.seconds

    @property
    def components(self) -> dict[str, float]:
        return {"reference_queries": self.seconds}

    def layer(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The layer's queries and key scores (``None`` where there are none), handed over once."""
        return self.queries.pop(name, None), (self.key_scores or {}).pop(name, None)


class LayeredRepeatQueries:
    """``repeat`` queries produced a layer at a time, when the executor asks for a layer: the re-read of
    the document runs inside the job's layer slices, a layer per slice, instead of all at once in the
    step that ships the job (which froze the batch for about a prefill of the document). Same interface
    as :class:`ExtraQueries` (``positions``, ``layer``); it costs nothing before the first slice
    (``seconds`` 0), and the executor times each layer's share as its ``reference_queries`` component.
    """

    seconds = 0.0
    query_seconds = 0.0

    @property
    def components(self) -> dict[str, float]:
        return {}

    def __init__(self, names: list[str], run: RepeatPass) -> None:
        self._names, self._run = names, run
        self._ready: dict[str, tuple] = {}
        self.positions = run.positions
        self.layers_made = 0

    def layer(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        while name not in self._ready and self.layers_made < len(self._names):
            # on the CPU, where the reference forward runs: the executor moves them to the keys' device
            self._ready[self._names[self.layers_made]] = self._run.next_layer()
            self.layers_made += 1
        return self._ready.pop(name, (None, None))


@dataclass
class OnPolicyLayers:
    """One job compacted on-policy: layer name -> ``(keys, values, β, fit error)`` in the full new layout
    (what the executor writes), produced by one teacher-forced pass; and what it cost (the same
    ``seconds`` / ``query_seconds`` / ``components`` as :class:`ExtraQueries`)."""

    layers: dict[str, tuple]
    generation_seconds: float  # producing the rows (self-study generation)
    pass_seconds: float  # the pass, every layer's fit included
    fit_timings: dict = field(default_factory=dict)  # the fits' components, summed over layers
    rows: list = field(default_factory=list)  # the teacher-forced rows: (token ids, logical positions)

    @property
    def seconds(self) -> float:
        return self.generation_seconds + self.pass_seconds

    @property
    def forward_seconds(self) -> float:
        """The pass without its fits: the reference forward of the rows."""
        return max(0.0, self.pass_seconds - sum(self.fit_timings.values()))

    @property
    def query_seconds(self) -> float:
        """Of :attr:`seconds`, producing reference queries: the generation and the pass's forward."""
        return self.generation_seconds + self.forward_seconds

    @property
    def components(self) -> dict[str, float]:
        return {**self.fit_timings, "reference_queries": self.generation_seconds,
                "on_policy_forward": self.forward_seconds}


class SyntheticQueryProducer:
    def __init__(self, model: ReferenceLlama, tokenizer, settings) -> None:
        self.model = model
        self.settings = settings
        self.encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.pieces = TokenPieces(tokenizer.decode)  # token id -> its text, for scoring whole words
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

    def _layer_names(self, kv) -> list[str]:
        names = sorted(kv.layer_names(), key=layer_index)
        if len(names) != self.model.num_layers:
            raise ValueError(f"{len(names)} attention layers in the engine, {self.model.num_layers} in the checkpoint")
        return names

    @staticmethod
    def _prefix_layer(job, kv, name: str) -> LayerKV:
        """One layer of the request's KV up to the span end, as CPU fp32 for the reference forward."""
        keys, values = kv.gather(name, job.src_block_ids, job.layout.span_end)
        keys, values = keys.float().cpu(), values.float().cpu()
        return LayerKV(keys, values, torch.zeros(keys.shape[:2]))

    def _prefix_cache(self, job, kv) -> tuple[list[str], list[LayerKV]]:
        """The request's KV up to the span end, per layer in layer order (see :meth:`_prefix_layer`)."""
        names = self._layer_names(kv)
        return names, [self._prefix_layer(job, kv, name) for name in names]

    def produce_on_policy(self, job, kv, prompt_ids: list[int], queries: dict, positions) -> OnPolicyLayers:
        """Compact every layer of ``job`` on-policy (``on_policy`` setting): the source's rows (self-study
        prompts with their greedy answers, or the repeat prompt with the context) are produced first, then
        teacher-forced once; when the pass reaches layer l it is compacted right there, on the context's
        own queries (``queries``, already capped by ``query_mix``) plus the rows' queries at layer l, which
        went through the compacted layers < l. Same maths as the offline study (``benchmarks
        query-sources --offline``, variant ``onpolicy:context@256+ss_continue``)."""
        layout = job.layout
        names, cache = self._prefix_cache(job, kv)
        end = layout.span_end
        context = prompt_ids[:end]
        started = time.perf_counter()
        if job.queries == "self_study":
            made = self_study_batched(self.model, cache, build_prompts(self.family, self.encode, context),
                                      self.settings.self_study_tokens, self.settings.self_study_seconds)
            rows = [(ids[hide:], pos[hide:]) for ids, pos, hide in made.info["rows"]]
            skip = [0] * len(rows)
        elif job.queries == "repeat":
            repeated = self.repeat_prompt + context[: self.settings.repeat_max_tokens]
            rows, skip = [(repeated, torch.arange(end, end + len(repeated)))], [len(self.repeat_prompt)]
        else:
            raise ValueError(f"on-policy needs a synthetic query source, not {job.queries!r}")
        generation_seconds = time.perf_counter() - started
        # The prompt of a repeat row is fed but not fitted on (as off-policy).
        used = torch.cat([torch.arange(len(ids)) >= k for (ids, _), k in zip(rows, skip)])
        layers: dict[str, tuple] = {}
        timings: dict[str, float] = {}

        def compact_here(index: int, row_queries: torch.Tensor, row_positions: torch.Tensor):
            name = names[index]
            keys, values = kv.gather(name, job.src_block_ids, layout.num_tokens)
            own = queries.get(name)
            new_keys, new_values, beta, error = compact_layer(
                job, keys, values, own.float() if own is not None else None, positions, kv.scale(name),
                row_queries[used], row_positions[used],
                layer_index(name) if job.head_targets is not None else None, timings=timings,
            )
            layers[name] = (new_keys, new_values, beta, error)
            # The rows go on over the compacted prefix (sinks, compacted span, padding with β = -inf).
            prefix = layout.prefix_physical_len
            return LayerKV(new_keys[:, :prefix].float().cpu(), new_values[:, :prefix].float().cpu(),
                           beta[:, :prefix].float().cpu()), error

        started = time.perf_counter()
        on_policy_pass(self.model, cache, rows, compact_here)
        return OnPolicyLayers(layers, generation_seconds, time.perf_counter() - started, timings, rows)

    def produce(self, job, kv, prompt_ids: list[int]) -> ExtraQueries | LayeredRepeatQueries:
        end = job.layout.span_end
        context = prompt_ids[:end]
        if job.queries == "repeat":
            # A layer at a time, inside the job's layer slices; each layer's cache is read when reached.
            names = self._layer_names(kv)
            scored = job.options.get("reduction") == RECONSTRUCTION
            words = word_ids(self.pieces(context)) if scored and job.options.get("words") else None
            run = RepeatPass(self.model, lambda i: self._prefix_layer(job, kv, names[i]), context, self.repeat_prompt,
                             self.settings.repeat_max_tokens, key_scores=scored, words=words)
            return LayeredRepeatQueries(names, run)
        if job.queries != "self_study":
            raise ValueError(f"unknown query source {job.queries!r}")
        names, cache = self._prefix_cache(job, kv)
        made = self_study_batched(
            self.model, cache, build_prompts(self.family, self.encode, context),
            self.settings.self_study_tokens, self.settings.self_study_seconds
        )
        # on the CPU, where the reference forward ran: the executor moves each layer's to the keys' device
        return ExtraQueries(dict(zip(names, made.queries)), made.positions, made.seconds)

