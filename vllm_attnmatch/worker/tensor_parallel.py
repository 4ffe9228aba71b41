"""Compaction under tensor parallelism: each rank compacts its own KV heads of the same job.

Every rank receives the same jobs (the scheduler output is broadcast) and writes its heads' part of the
same destination blocks, but only one rank's output reaches the scheduler. So:

- a job is applied only if it succeeded on *every* rank: :func:`agree_on_results` all-reduces (min) the
  success flags over the tensor-parallel group before the results go back, and a job that failed anywhere
  is reported failed everywhere (the scheduler then frees the destination blocks and serves the request
  uncompacted, on all ranks alike);
- per-head budgets are planned for the model's global KV heads: :func:`job_for_this_rank` keeps this
  rank's rows.

With one rank both are no-ops.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from vllm_attnmatch.contract.jobs import CompactionJob, CompactionResult
from vllm_attnmatch.worker.executor import DUMP_DIR_ENV

OTHER_RANK_FAILED = "failed on another tensor-parallel rank"
LAST_RANK_FAULT = "solver_on_last_rank"


def _tp_group():
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group()


def rank_kv_heads(total_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """Global indices of the KV heads a tensor-parallel rank holds, in its local order (vLLM's
    ``QKVParallelLinear``: contiguous slices, or one replicated head per rank when ``tp_size`` exceeds
    the head count)."""
    if tp_size >= total_kv_heads:
        replicas = tp_size // total_kv_heads
        head = tp_rank // replicas
        return range(head, head + 1)
    per_rank = total_kv_heads // tp_size
    return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)


def rank_head_targets(
    targets: tuple[tuple[int, ...], ...], total_kv_heads: int, tp_size: int, tp_rank: int
) -> tuple[tuple[int, ...], ...]:
    """The rows of a job's global ``(L, H_total)`` budgets that belong to this rank's KV heads."""
    heads = rank_kv_heads(total_kv_heads, tp_size, tp_rank)
    for row in targets:
        if len(row) != total_kv_heads:
            raise ValueError(f"head budgets cover {len(row)} KV heads, the model has {total_kv_heads}")
    return tuple(tuple(row[h] for h in heads) for row in targets)


def job_for_this_rank(job: CompactionJob, total_kv_heads: int) -> CompactionJob:
    """``job`` with its per-head budgets narrowed to the KV heads this rank holds (and the test-only
    fault ``solver_on_last_rank`` turned into a solver error on the last rank, nothing on the others)."""
    group = _tp_group()
    if job.fault == LAST_RANK_FAULT:
        last = group.rank_in_group == group.world_size - 1
        job = dataclasses.replace(job, fault="solver" if last else None)
    if job.head_targets is None:
        return job
    targets = rank_head_targets(job.head_targets, total_kv_heads, group.world_size, group.rank_in_group)
    return dataclasses.replace(job, head_targets=targets)


def agree_on_result(result: CompactionResult) -> CompactionResult:
    """:func:`agree_on_results` for the one job that finished on this step."""
    return agree_on_results([result])[0]


def agree_on_results(results: list[CompactionResult]) -> list[CompactionResult]:
    """Each result as it stands on every rank: failed if it failed on any rank. Every rank must call this
    with the results of the same jobs in the same order (they run the same step plan)."""
    group = _tp_group()
    if group.world_size == 1 or not results:
        return results
    ok = torch.tensor([1 if r.ok else 0 for r in results], dtype=torch.int32)
    torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=group.cpu_group)
    return [
        r if agreed or not r.ok
        else dataclasses.replace(r, ok=False, tokens_after=r.tokens_before, error=OTHER_RANK_FAILED)
        for r, agreed in zip(results, ok.tolist())
    ]


def separate_dumps_per_rank(rank: int) -> None:
    """Debug dumps (``VLLM_ATTNMATCH_DUMP_DIR``) of rank r > 0 go to ``<dir>/rank<r>/``: every rank dumps its
    own heads of the same job under the same name. Rank 0 keeps the directory itself (this worker process
    only: the environment is per process)."""
    base = os.environ.get(DUMP_DIR_ENV)
    if base and rank > 0:
        path = os.path.join(base, f"rank{rank}")
        os.makedirs(path, exist_ok=True)
        os.environ[DUMP_DIR_ENV] = path
