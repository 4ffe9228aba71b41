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

from benchmarks.common import answers, output, sets
from benchmarks.common.stamp import describe

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
    from benchmarks.suites.fidelity import _methods

    if result is None:
        return _missing("fidelity")
    cfg = result["config"]
    return [
        _source(result, "fidelity"), "",
        (f"Texts ({len(cfg['texts'])}, split into DEV and TEST in benchmarks/common/corpus.py): a {cfg['doc_tokens']}-token document is reduced to the budget, then the next "
        f"{cfg['cont_tokens']} tokens are scored after it through the server (prompt logprobs), mean over texts."), "",
        *answers.fidelity_lines(answers.fidelity(result)), "",
        f"![fidelity vs ratio]({LINK}/fidelity_latest.png)", "",
        *sets.lines(result["cells"], "kl", ".4f", f"KL@{cfg['top']}(full ‖ reduced) per token", _methods(result)),
        *sets.lines(result["cells"], "delta_nll_pct", "+.2f", "ΔNLL of the continuation, % of full-context NLL",
                    _methods(result)),
    ]


#: The corpus studies behind the README's headline (one merged file per document length, longest first),
#: and which of their method labels is which preset.
CORPUS_RESULTS = ("offline_corpus_1024", "offline_corpus_512")
PRESET_METHODS = {"default": "preset:default", "quality": "preset:quality", "fast": "preset:fast", "paper": "preset:paper"}


def headline_block(results: list[dict | None], directory: Path = output.RESULTS) -> list[str]:
    """The README's one result: each preset's continuation KL on the TEST texts (mean [min–max], and the
    change against the best published-strength baseline), DEV beside it, from each offline corpus study;
    the first study's plot (its ``<stem>.png`` in ``directory``) right after its table."""
    results = [r for r in results if r]
    if not results:
        return ["*Not measured yet* — run `python -m benchmarks offline --texts test dev ...` (see docs/benchmarks.md)."]
    out: list[str] = []
    for i, result in enumerate(results):
        out += _corpus_table(result) + [""]
        if i == 0:
            out += _plot_line(result, directory)
    return out[:-1]


def _plot_line(result: dict, directory: Path) -> list[str]:
    """The headline figure's image link, or nothing when the study has no plot."""
    stem = result.get("stem", "")
    if not stem or not (directory / f"{stem}.png").exists():
        return []
    size = "/".join(str(t) for t in sorted({row["T"] for row in result["rows"]}))
    return [f"![continuation KL vs kept ratio, {size}-token documents, TEST and DEV texts]({LINK}/{stem}.png)", ""]


def _corpus_table(result: dict) -> list[str]:
    rows = result["rows"]
    summary = sets.per_set(rows, "kl")
    ratios = sorted({row["ratio"] for row in rows}, reverse=True)
    doc_tokens = sorted({row["T"] for row in rows})
    stem = result.get("stem", "")

    def kl(set_name: str, method: str, ratio: float) -> dict[str, float]:
        return {row["text"]: row["kl"] for row in rows
                if row["method"] == method and row["ratio"] == ratio and sets.set_name(row["text"]) == set_name}

    def cell(set_name: str, method: str, ratio: float, versus: bool) -> str:
        st = summary.get(set_name, {}).get((method, ratio))
        if not st or st["mean"] is None:
            return "–"
        text = f"{st['mean']:.3f}"
        if set_name == "test":
            text += f" [{st['min']:.3f}–{st['max']:.3f}]"
        name, _ = sets.best_baseline(summary.get(set_name, {}), ratio)
        if versus and name:  # against the baseline's mean over the same texts (a preset may cover fewer)
            own, base = kl(set_name, method, ratio), kl(set_name, name, ratio)
            shared = [t for t in own if t in base]
            best = sum(base[t] for t in shared) / len(shared) if shared else 0.0
            if best > 0:
                text += f" ({100 * (sum(own[t] for t in shared) / len(shared) - best) / best:+.0f} %"
                text += ")" if len(shared) == len(base) else f" on {len(shared)} texts)"
        return text

    body = []
    for preset, method in PRESET_METHODS.items():
        if any(row["method"] == method for row in rows):
            body.append([f"`{preset}`"] + [f"{cell('test', method, x, True)} · dev {cell('dev', method, x, True)}"
                                          for x in ratios])
    best = []
    for x in ratios:  # each set's own best baseline (the one the percentages compare with)
        name, _ = sets.best_baseline(summary.get("test", {}), x)
        dev_name, _ = sets.best_baseline(summary.get("dev", {}), x)
        dev = f" · dev {cell('dev', dev_name, x, False)} {dev_name}" if dev_name else ""
        best.append(f"{cell('test', name, x, False)} {name}{dev}" if name else "–")
    body.append(["best published baseline"] + best)
    meta = result["meta"]
    count = {name: len({row["text"] for row in rows if sets.set_name(row["text"]) == name}) for name in ("test", "dev")}
    size = "/".join(str(t) for t in doc_tokens)
    return [
        f"**{size}-token documents.** Continuation KL(full ‖ compacted) per token, lower is better, mean over the "
        f"{count['test']} TEST texts [min–max] (change against the best published-strength baseline of H2O, SnapKV, "
        f"TOVA, StreamingLLM at the same budget) · the same on the {count['dev']} DEV texts, on which every default "
        f"was chosen. SmolLM2-135M, offline reference forward ([how](docs/benchmarks.md), [rows]({LINK}/{stem}.md), "
        f"{describe(meta)}):", "",
        *output.table(["preset"] + [f"r = {x:g}" for x in ratios], body),
    ]


def speed_block(result: dict | None) -> list[str]:
    if result is None:
        return _missing("speed")
    from benchmarks.suites.speed import markdown

    table = [line for line in markdown(result).splitlines() if line.startswith("|")]
    return [_source(result, "speed"), "", *answers.speed_lines(answers.speed(result)), "",
            f"![compaction vs prefill time]({LINK}/speed_latest.png)", "", *table]


def memory_block(result: dict | None) -> list[str]:
    if result is None:
        return _missing("memory")
    from benchmarks.suites.memory import markdown

    table = [line for line in markdown(result).splitlines() if line.startswith("|")]
    return [_source(result, "memory"), "", *answers.memory_lines(answers.memory(result)), "",
            f"![concurrency in a small pool]({LINK}/memory_latest.png)", "", *table]


def _with_stem(result: dict | None, stem: str) -> dict | None:
    return {**result, "stem": stem} if result else None


def snippet(path: Path) -> str:
    """A study's ``<name>_latest.md`` as it stands, without its ``#`` title (the README has its own)."""
    return "\n".join(line for line in path.read_text().splitlines() if not line.startswith("# ")).strip()


def sections(directory: Path = output.RESULTS, readme: str = "") -> dict[str, str]:
    """Marker name → generated markdown: the suites from their ``*_latest.json``, and every other marker
    of ``readme`` that has a ``<name>_latest.md`` in ``directory`` from that file."""
    fidelity_result = output.read("fidelity_latest", directory)
    out = {
        "headline": "\n".join(headline_block([_with_stem(output.read(n, directory), n) for n in CORPUS_RESULTS],
                                                   directory)),
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
