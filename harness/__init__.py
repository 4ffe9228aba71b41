"""Start and talk to a real vLLM server: the harness the end-to-end tests and the benchmarks share.

``harness.server``: ``Server`` (a ``vllm-attnmatch serve`` process on a free port, its log, health and
``/metrics``) and ``run_mixed_load`` (plain and compacted requests at once against a stock server).
It is neither the plugin (``vllm_attnmatch`` holds no test or benchmark code) nor a benchmark: ``tests/``
imports this and never ``benchmarks``.
"""
