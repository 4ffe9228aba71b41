#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit tests and end-to-end tests against the real
# server with the bundled model). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest tests "$@"
