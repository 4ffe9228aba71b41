#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit tests and end-to-end tests against the real
# server with the bundled model). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# --durations: the slowest tests are printed at the end of every run (the suite is long on 2 cores).
exec python -m pytest tests --durations=15 "$@"
