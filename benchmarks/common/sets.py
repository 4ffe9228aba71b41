"""Per-set summaries of per-text results: TEST-set means with their spread over texts, DEV beside them.

Why: a mean over texts hides a method that loses badly on one kind of text, and numbers on the texts the
defaults were tuned on flatter them (issue 12.1). Every benchmark reports, per (method, ratio), the mean
over the TEST texts with its min–max and a bootstrap interval over texts, and the DEV mean next to it.
Pure functions over row dicts (``text``, ``method``, ``ratio`` and a metric), shared by the fidelity
suite and the offline study.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from . import corpus
from .output import fmt, table

#: baselines at their published strength (the bar the served default must clear by ≥ 10 % mean KL)
PUBLISHED_BASELINES = ("h2o", "snapkv", "tova", "streaming")
SET_ORDER = ("test", "dev", "other")


def set_name(text: str) -> str:
    return corpus.set_of(text) or "other"


def bootstrap(values: list[float], reps: int = 2000, level: float = 0.9, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over texts (resampling texts with replacement)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(rng.choice(values) for _ in values) / len(values) for _ in range(reps))
    lo = means[int((1 - level) / 2 * reps)]
    hi = means[min(reps - 1, int((1 + level) / 2 * reps))]
    return lo, hi


def stats(values: list[float]) -> dict:
    """mean, min, max, 90 % bootstrap interval and n of per-text values."""
    if not values:
        return {"n": 0, "mean": None, "min": None, "max": None, "ci": (None, None)}
    return {"n": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values),
            "ci": bootstrap(values)}


def per_set(rows: Iterable[dict], key: str = "kl", method_key: str = "method") -> dict:
    """``{set: {(method, ratio): stats}}`` of ``key`` over the texts of each set."""
    groups: dict[str, dict[tuple[str, float], list[float]]] = {}
    for r in rows:
        value = r.get(key)
        if value is None:
            continue
        groups.setdefault(set_name(r["text"]), {}).setdefault((r[method_key], r["ratio"]), []).append(float(value))
    return {s: {k: stats(v) for k, v in cells.items()} for s, cells in groups.items()}


def cell(st: dict | None, spec: str = ".3f") -> str:
    """``mean [min–max]`` (or – when missing)."""
    if not st or st["mean"] is None:
        return "–"
    if st["n"] == 1:
        return fmt(st["mean"], spec)
    return f"{fmt(st['mean'], spec)} [{fmt(st['min'], spec)}–{fmt(st['max'], spec)}]"


def best_baseline(summary: dict, ratio: float, baselines=PUBLISHED_BASELINES) -> tuple[str | None, float | None]:
    """The published-strength baseline with the lowest mean at ``ratio`` in one set's summary."""
    best = (None, None)
    for m in baselines:
        st = summary.get((m, ratio))
        if st and st["mean"] is not None and (best[1] is None or st["mean"] < best[1]):
            best = (m, st["mean"])
    return best


def lines(rows: list[dict], key: str = "kl", spec: str = ".3f", title: str = "mean continuation KL",
          methods: list[str] | None = None, method_key: str = "method") -> list[str]:
    """Markdown: one table per set present (TEST first) with ``mean [min–max]`` over texts per (method,
    ratio), then the gain of every other method over the best published baseline per set."""
    summary = per_set(rows, key, method_key)
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    order = methods or list(dict.fromkeys(r[method_key] for r in rows))
    out: list[str] = []
    for s in [s for s in SET_ORDER if s in summary]:
        texts = sorted({r["text"] for r in rows if set_name(r["text"]) == s})
        label = {"test": "TEST set (reported; never tuned on)", "dev": "DEV set (all tuning)",
                 "other": "texts outside the corpus"}[s]
        out += [f"### {title}: {label}, {len(texts)} texts", "",
                f"Mean over texts [min–max over texts]. Texts: {', '.join(texts)}.", ""]
        out += table(["method"] + [f"r={x:g}" for x in ratios],
                     [[m] + [cell(summary[s].get((m, x)), spec) for x in ratios]
                      for m in order if any((m, x) in summary[s] for x in ratios)])
        gains = []
        for m in order:
            if m in PUBLISHED_BASELINES or not any((m, x) in summary[s] for x in ratios):
                continue
            row = [m]
            for x in ratios:
                name, best = best_baseline(summary[s], x)
                st = summary[s].get((m, x))
                if best is None or not st or st["mean"] is None or best <= 0:
                    row.append("–")
                else:
                    lo, hi = st["ci"]
                    row.append(f"{100 * (st['mean'] - best) / best:+.1f} % vs {name} "
                               f"(90 % CI of mean {fmt(lo, spec)}–{fmt(hi, spec)})")
            gains.append(row)
        if gains and any(b[0] for b in (best_baseline(summary[s], x) for x in ratios)):
            out += ["", f"Change of the mean against the best published-strength baseline "
                    f"({', '.join(PUBLISHED_BASELINES)}) on this set (negative = lower {key}):", ""]
            out += table(["method"] + [f"r={x:g}" for x in ratios], gains)
        out.append("")
    return out
