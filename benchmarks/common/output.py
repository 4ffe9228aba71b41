"""Where results go and how tables look: ``benchmarks/results/<suite>_<tag>.{json,md,png}``.

Why one writer: the README generator reads these files back, so every suite must write the same shape
(``suite``, ``quick``, ``meta`` stamp, ``config``, data) under the same names. Quick smoke runs go to
``<suite>_quick.*`` so they never overwrite the ``_latest`` results the README stands on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results"


def stem(suite: str, quick: bool, tag: str | None = None) -> str:
    return f"{suite}_{tag or ('quick' if quick else 'latest')}"


def write(result: dict, name: str, markdown: str, plot: Callable[[dict, Path], None] | None = None,
          directory: Path = RESULTS) -> dict[str, Path]:
    """Write ``name``.json / .md (/ .png) and return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / f"{name}.json", "md": directory / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    if plot is not None:
        try:
            plot(result, directory / f"{name}.png")
            paths["png"] = directory / f"{name}.png"
        except ImportError as exc:  # matplotlib is an optional extra ([bench])
            print(f"no plot: {exc}")
    return paths


def read(name: str, directory: Path = RESULTS) -> dict | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _jsonable(value):
    if hasattr(value, "model_dump"):
        return value.model_dump()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def table(headers: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def fmt(value, spec: str, missing: str = "–") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return format(value, spec)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None
