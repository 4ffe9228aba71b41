# The few commands a newcomer needs. Each one sets the .venv up first if needed.
.PHONY: setup serve test test-fast bench bench-quick lint

setup:
	bash scripts/setup.sh

ATTNMATCH ?= default
serve:  # the bundled model on :8000 with --attnmatch $(ATTNMATCH) (e.g. make serve ATTNMATCH=fast)
	ATTNMATCH='$(ATTNMATCH)' bash scripts/serve.sh

test:
	bash scripts/test.sh -q

test-fast:  # maths and config only, no server
	bash scripts/test.sh -q -m "not server"

bench:  # fidelity through the server (~15 min on 2 cores), then the README's results
	bash scripts/setup.sh && .venv/bin/python -m benchmarks run --suite fidelity --update-readme

bench-quick:  # every suite at tiny sizes (a few minutes per server start); writes benchmarks/results/*_quick.*
	bash scripts/setup.sh && .venv/bin/python -m benchmarks run --suite all --quick

lint:
	.venv/bin/python -m ruff check vllm_attnmatch tests benchmarks harness || true
