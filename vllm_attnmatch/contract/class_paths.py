"""Dotted paths of the classes the front end hands to vLLM, which imports them in its own processes.

Strings, so that the front end (and the support matrix, which accepts them when a user names them
explicitly) can name the scheduler, the workers and the attention backends without importing them:
importing a worker or a backend pulls in the platform's vLLM code, and the CUDA one fails on CPU. A unit
test imports each path, so a renamed class cannot leave a stale string here.
"""

SCHEDULER_CLS = "vllm_attnmatch.engine.scheduler.AttnMatchScheduler"
CPU_WORKER_CLS = "vllm_attnmatch.worker.cpu_worker.AttnMatchCPUWorker"
GPU_WORKER_CLS = "vllm_attnmatch.worker.gpu_worker.AttnMatchGPUWorker"
CPU_BACKEND_CLS = "vllm_attnmatch.attention.cpu_backend.AttnMatchCPUAttentionBackend"
TRITON_BACKEND_CLS = "vllm_attnmatch.attention.triton_backend.AttnMatchTritonAttentionBackend"
VALIDATOR_CLS = "vllm_attnmatch.frontend.validation:AttnMatchParamsValidator"
