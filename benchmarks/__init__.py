"""Benchmarks of vllm-attnmatch: what compaction costs and buys, measured through a real vLLM server.

Run ``python -m benchmarks --help``. The layout:

- ``cli`` (the command line: suites, README update, the other studies) and ``update_readme`` (the README's
  result blocks from ``results/*_latest.*``);
- ``suites`` — one module per suite or study: ``fidelity``, ``speed``, ``memory``, ``kernels``, ``workload``,
  ``recall``, ``offline``, ``on_policy``, ``prefix_reuse``, ``load``, ``query_sources``, ``online_ceiling``,
  ``stall``, ``capture_memory``, ``compaction_cost``;
- ``common`` — what the suites share: ``stamp`` (machine, versions, git commit, command), ``texts`` and
  ``corpus`` (real text), ``sets`` (DEV/TEST summaries), ``tasks`` (retrieval tasks), ``serving`` (start or
  reach a server, requests, /metrics), ``scoring`` (KL / ΔNLL / top-1), ``output`` (result files, tables),
  ``plots``, ``answers`` (plain answers from results);
- ``tests`` — tests of this code, run with the project's tests by ``scripts/test.sh``.

The server process itself is started by ``harness.server``, which the end-to-end tests share.
"""
