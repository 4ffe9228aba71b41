"""vllm-attnmatch: Attention Matching KV-cache compaction (arXiv 2602.16284) as a vLLM plugin."""

__version__ = "0.1.0"
