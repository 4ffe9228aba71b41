"""Import the repository as if it were installed, without pip: for ``scripts/gpu_check.sh`` on a bare GPU image.

Python imports ``sitecustomize`` at start-up from ``sys.path``, so putting this folder on ``PYTHONPATH``
makes every interpreter of the check (pytest, the subprocesses some tests start, the benchmarks) find
``vllm_attnmatch`` (kernels and presets included: they are ordinary sub-packages) and ``benchmarks`` in this
checkout, whatever its working directory. With ``ATTNMATCH_BLOCK_VLLM=1`` importing vLLM fails, as on a machine without it (how the check's
test selection is proven vLLM-free on a machine that has vLLM). Any other ``sitecustomize`` on the path is
still run afterwards.
"""

import importlib.abc
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class _NoVllm(importlib.abc.MetaPathFinder):
    """``import vllm`` (or any submodule) fails as on a machine without it; nothing lands in ``sys.modules``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "vllm" or fullname.startswith("vllm."):
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by ATTNMATCH_BLOCK_VLLM=1)", name=fullname)
        return None


def _install() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if os.environ.get("ATTNMATCH_BLOCK_VLLM") == "1" and not any(isinstance(f, _NoVllm) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoVllm())


def _chain() -> None:
    """Run the sitecustomize this one shadows, if there is one further down the path."""
    for entry in sys.path:
        if not entry or Path(entry).resolve() == HERE:
            continue
        candidate = Path(entry) / "sitecustomize.py"
        if candidate.is_file():
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as exc:  # noqa: BLE001 - never break start-up for it
                print(f"gpu_check_env: shadowed {candidate} failed: {exc}", file=sys.stderr)
            return


_install()
_chain()
