# The few commands a newcomer needs. Each one sets the .venv up first if needed.
.PHONY: setup serve test test-fast bench lint

setup:
	bash scripts/setup.sh

serve:
	bash scripts/serve.sh

test:
	bash scripts/test.sh -q

test-fast:  # maths and config only, no server
	bash scripts/test.sh -q -m "not server"

bench:
	bash scripts/setup.sh && .venv/bin/python benchmarks/fidelity_offline.py

lint:
	.venv/bin/python -m ruff check vllm_attnmatch kernels tests benchmarks || true
