"""Tests of the benchmark code (CLI parsing, result files and README blocks, corpus and tasks, the kernel
benchmark's smoke run). ``scripts/test.sh`` runs them with ``tests/``; ``tests/`` never imports benchmarks."""
