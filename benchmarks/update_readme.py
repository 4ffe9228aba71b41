"""Regenerate the README's and docs/benchmarks.md's results from the latest benchmark JSON (between ``<!-- BEGIN x -->`` / ``<!-- END x -->``).

Why generated: the README states what compaction costs and buys; those sentences and tables are computed
from ``benchmarks/results/<suite>_latest.json`` so they can never drift from the measurements. Quick
smoke runs (``*_quick.json``) are never used. A suite not measured yet says so and gives the command.

    python -m benchmarks readme          (or: python benchmarks/update_readme.py)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the benchmarks package, not sibling modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import answers, output
from benchmarks.stamp import describe

ROOT = Path(__file__).resolve().parent.parent
LINK = "benchmarks/results"
FULL_COMMANDS = {
    "fidelity": "python -m benchmarks run --suite fidelity",
    "speed": "python -m benchmarks run --suite speed",
    "memory": "python -m benchmarks run --suite memory",
}


def _missing(suite: str) -> list[str]:
    return [f"*Not measured yet* — run `{FULL_COMMANDS[suite]}`, then `python -m benchmarks readme`."]


def _source(result: dict, suite: str) -> str:
    return (f"`{result['meta']['command']}` — {describe(result['meta'])} "
            f"([table]({LINK}/{suite}_latest.md), [JSON]({LINK}/{suite}_latest.json))")


def fidelity_block(result: dict | None) -> list[str]:
    from benchmarks.fidelity import grid

    if result is None:
        return _missing("fidelity")
    cfg = result["config"]
    return [
        _source(result, "fidelity"), "",
        (f"Texts {', '.join(cfg['texts'])}: a {cfg['doc_tokens']}-token document is reduced to the budget, then the next "
        f"{cfg['cont_tokens']} tokens are scored after it through the server (prompt logprobs), mean over texts."), "",
        *answers.fidelity_lines(answers.fidelity(result)), "",
        f"![fidelity vs ratio]({LINK}/fidelity_latest.png)", "",
        "ΔNLL of the continuation, % of the full-context NLL (lower is better):", "",
        *grid(result, "delta_nll_pct", "+.2f"), "",
        f"KL@{cfg['top']}(full ‖ reduced) per token:", "",
        *grid(result, "kl", ".4f"),
    ]


def headline_block(result: dict | None) -> list[str]:
    """The README's one result: KL of the continuation against the ratio, every method, with the plot."""
    from benchmarks.fidelity import grid

    if result is None:
        return _missing("fidelity")
    return [
        *answers.fidelity_lines(answers.fidelity(result)), "",
        f"KL@{result['config']['top']}(full ‖ reduced) per continuation token, lower is better "
        f"([all results](docs/benchmarks.md), {describe(result['meta'])}):", "",
        *grid(result, "kl", ".4f"), "",
        f"![fidelity vs ratio]({LINK}/fidelity_latest.png)",
    ]


def speed_block(result: dict | None) -> list[str]:
    if result is None:
        return _missing("speed")
    from benchmarks.speed import markdown

    table = [line for line in markdown(result).splitlines() if line.startswith("|")]
    return [_source(result, "speed"), "", *answers.speed_lines(answers.speed(result)), "",
            f"![compaction vs prefill time]({LINK}/speed_latest.png)", "", *table]


def memory_block(result: dict | None) -> list[str]:
    if result is None:
        return _missing("memory")
    from benchmarks.memory import markdown

    table = [line for line in markdown(result).splitlines() if line.startswith("|")]
    return [_source(result, "memory"), "", *answers.memory_lines(answers.memory(result)), "",
            f"![concurrency in a small pool]({LINK}/memory_latest.png)", "", *table]


def snippet(path: Path) -> str:
    """A study's ``<name>_latest.md`` as it stands, without its ``#`` title (the README has its own)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith("# ")).strip()


def sections(directory: Path = output.RESULTS, readme: str = "") -> dict[str, str]:
    """Marker name → generated markdown: the suites from their ``*_latest.json``, and every other marker
    of ``readme`` that has a ``<name>_latest.md`` in ``directory`` from that file."""
    fidelity_result = output.read("fidelity_latest", directory)
    out = {
        "headline": "\n".join(headline_block(fidelity_result)),
        "fidelity": "\n".join(fidelity_block(fidelity_result)),
        "speed": "\n".join(speed_block(output.read("speed_latest", directory))),
        "memory": "\n".join(memory_block(output.read("memory_latest", directory))),
    }
    for name in re.findall(r"<!-- BEGIN (\w+) -->", readme):
        if name not in out and (directory / f"{name}_latest.md").exists():
            out[name] = snippet(directory / f"{name}_latest.md")
    return out


def replace(text: str, generated: dict[str, str], missing_ok: bool = False) -> str:
    """``text`` with every marked section replaced; a missing marker is an error (the page moved on) unless
    ``missing_ok`` (several pages share the generated sections, each holding some of them)."""
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n)(?:.*?\n)?(<!-- END {name} -->)", re.DOTALL)
        if not pattern.search(text):
            if missing_ok:
                continue
            raise SystemExit(f"no <!-- BEGIN {name} --> / <!-- END {name} --> markers")
        block = body.strip() + "\n" if body.strip() else ""
        text = pattern.sub(lambda m, block=block: m.group(1) + block + m.group(2), text)
    return text


#: Pages with generated sections, and how each reaches ``benchmarks/results`` from where it lives.
PAGES = {ROOT / "README.md": LINK, ROOT / "docs" / "benchmarks.md": "../" + LINK}


def main(argv=None) -> int:
    texts = {page: page.read_text() for page in PAGES}
    generated = sections(readme="\n".join(texts.values()))
    placed = {name for text in texts.values() for name in re.findall(r"<!-- BEGIN (\w+) -->", text)}
    if missing := sorted(set(generated) - placed):
        raise SystemExit(f"no page has the markers of {', '.join(missing)}")
    for page, link in PAGES.items():
        page_sections = {name: body.replace(f"]({LINK}/", f"]({link}/") for name, body in generated.items()}
        page.write_text(replace(texts[page], page_sections, missing_ok=True))
        print(f"updated {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
