"""The workers, stood in for by the scheduler-side tests: each step's plan is run the way the runner runs it
(``JobRun.run_layers``), without a model or KV, so tests drive vLLM's real scheduler step by step."""

from __future__ import annotations

from vllm.v1.outputs import ModelRunnerOutput

from vllm_attnmatch.contract.jobs import RUNNER_OUTPUT_ATTR, SCHEDULER_OUTPUT_ATTR, CompactionResult, StepPlan


class StandInWorker:
    """Runs the step plans' layer slices like the runner: a job shipped in a step runs no layer in it,
    ``slices[r]`` layers (fewer at the end) afterwards, and its result comes back with its last layer."""

    def __init__(self, num_layers: int = 1) -> None:
        self.num_layers = num_layers
        self.left: dict[str, list] = {}  # req_id -> [job, layers left]
        self.layers_run: dict[str, int] = {}

    def step(self, scheduler):
        output = scheduler.schedule()
        plan = getattr(output, SCHEDULER_OUTPUT_ATTR, None) or StepPlan()
        for req_id in plan.cancel:
            self.left.pop(req_id, None)
        for job in plan.jobs:
            self.left[job.req_id] = [job, self.num_layers]
        results = []
        for req_id, count in plan.slices.items():
            job, left = self.left[req_id]
            ran = min(count, left)
            self.layers_run[req_id] = self.layers_run.get(req_id, 0) + ran
            self.left[req_id][1] = left - ran
            if left - ran == 0:
                del self.left[req_id]
                results.append(CompactionResult(req_id, True, 0.0, job.layout.num_tokens, job.layout.physical_len,
                                                job_id=job.job_id))
        ids = list(output.num_scheduled_tokens)
        tokens = [[5] if scheduler.requests[r].num_computed_tokens >= scheduler.requests[r].num_tokens else []
                  for r in ids]
        runner = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                   sampled_token_ids=tokens)
        setattr(runner, RUNNER_OUTPUT_ATTR, results)
        scheduler.update_from_output(output, runner)
        return output, plan
