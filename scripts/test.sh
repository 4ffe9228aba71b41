#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit tests and end-to-end tests against the real
# server with the bundled model). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# --durations: the slowest tests are printed at the end of every run (the suite is long on 2 cores).
# benchmarks/tests: the tests of the benchmark code, kept beside it (tests/ never imports benchmarks).
exec python -m pytest tests benchmarks/tests --durations=15 "$@"
