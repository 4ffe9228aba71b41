"""Regenerate the README's result tables from the latest benchmark results (between BEGIN/END markers).

    python benchmarks/update_readme.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def serve_fidelity_table() -> str:
    cells = json.loads((RESULTS / "serve_fidelity_latest.json").read_text())["cells"]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    ratios = sorted({c["ratio"] for c in cells}, reverse=True)

    def mean(method, ratio, key):
        values = [c[key] for c in cells if c["method"] == method and c["ratio"] == ratio]
        return sum(values) / len(values)

    lines = ["| method | " + " | ".join(f"r={r}" for r in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for m in methods:
        row = [f"{mean(m, r, 'delta_nll_pct'):+.2f} / {mean(m, r, 'kl_at_20'):.4f}" for r in ratios]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def prefix_reuse_table() -> str:
    text = (RESULTS / "prefix_reuse_latest.md").read_text()
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


SECTIONS = {"serve_fidelity": serve_fidelity_table, "prefix_reuse": prefix_reuse_table}


def main() -> int:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, build in SECTIONS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(\n<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            print(f"README has no {name} markers", file=sys.stderr)
            return 1
        text = pattern.sub(lambda m: m.group(1) + build() + m.group(2), text)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
