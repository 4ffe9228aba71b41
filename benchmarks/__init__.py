"""Benchmarks of vllm-attnmatch: what compaction costs and buys, measured through a real vLLM server.

Run ``python -m benchmarks --help``. One job per module:

- ``cli``: the command line (suites, README update, the other studies);
- suites — ``fidelity`` (continuation KL / ΔNLL / top-1 vs ratio, AM vs eviction and summarisation),
  ``speed`` (compaction vs prefill time, decode step vs KV length), ``memory`` (concurrency in a small
  KV pool), ``kernels`` (Triton kernels vs references; CUDA);
- other studies — ``offline`` (algorithm-level fidelity, no vLLM), ``on_policy``, ``prefix_reuse``, ``load``;
- shared — ``stamp`` (machine, versions, git commit, command), ``texts`` (real text), ``serving`` (start or
  reach a server, requests, /metrics), ``scoring`` (KL / ΔNLL / top-1 from prompt logprobs), ``output``
  (result files, tables), ``plots``, ``answers`` (plain answers from results), ``update_readme``.
"""
