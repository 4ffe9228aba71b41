"""Plain answers computed from result JSON: the sentences the README states, never typed by hand.

Why separate and pure: the same numbers go into each suite's markdown and into the README, and a unit
test can check them on a small synthetic result without a server.
"""

from __future__ import annotations

from .output import fmt, mean

AM_DEFAULT = "highest_attention"
AM_METHODS = ("highest_attention", "omp")
THRESHOLD_PCT = 2.0


def _means(cells: list[dict], key: str) -> dict[tuple[str, float], float]:
    out: dict[tuple[str, float], float] = {}
    for method, ratio in {(c["method"], c["ratio"]) for c in cells}:
        value = mean(c.get(key) for c in cells if c["method"] == method and c["ratio"] == ratio)
        if value is not None:
            out[(method, ratio)] = value
    return out


def report_cells(cells: list[dict]) -> tuple[str, list[dict]]:
    """The cells the answers stand on: the TEST set's when the run has any (never the texts the defaults
    were tuned on), else all of them; and which that was."""
    from .sets import set_name

    test = [c for c in cells if set_name(c["text"]) == "test"]
    return ("test", test) if test else ("all", cells)


def fidelity(result: dict, threshold: float = THRESHOLD_PCT) -> dict:
    """At which ratio each AM method stays within ``threshold`` % ΔNLL, and AM vs every other method
    (means over the TEST-set texts when the run has them)."""
    scope, cells = report_cells(result["cells"])
    dnll, kl = _means(cells, "delta_nll_pct"), _means(cells, "kl")
    ratios = sorted({r for _, r in dnll}, reverse=True)
    methods = list(dict.fromkeys(c["method"] for c in cells))
    within = {}
    for m in (m for m in AM_METHODS if m in methods):
        lowest = None
        for r in ratios:  # from the largest ratio down, while every ratio so far is within the threshold
            if (m, r) not in dnll or dnll[(m, r)] > threshold:
                break
            lowest = r
        within[m] = {"ratio": lowest, "delta_nll_pct": dnll.get((m, lowest)) if lowest is not None else None}
    am = AM_DEFAULT if AM_DEFAULT in methods else next((m for m in AM_METHODS if m in methods), None)
    versus = {}
    if am is not None:
        for other in (m for m in methods if m not in AM_METHODS):
            rows = []
            for r in ratios:
                if (am, r) in kl and (other, r) in kl:
                    rows.append({
                        "ratio": r,
                        "kl_am": kl[(am, r)], "kl_other": kl[(other, r)],
                        "kl_reduction_pct": 100.0 * (1 - kl[(am, r)] / kl[(other, r)]) if kl[(other, r)] > 0 else None,
                        "dnll_am": dnll[(am, r)], "dnll_other": dnll[(other, r)],
                        "dnll_gain_pp": dnll[(other, r)] - dnll[(am, r)],
                    })
            versus[other] = {"cells": rows, "am_lower_kl": sum(x["kl_am"] < x["kl_other"] for x in rows),
                             "am_lower_dnll": sum(x["dnll_am"] < x["dnll_other"] for x in rows), "of": len(rows)}
    cost = {}
    full_s = mean(v["request_s"] for v in result.get("full_context", {}).values())
    for m in (m for m in AM_METHODS if m in methods):
        for r in ratios:
            seconds = mean(c.get("compaction_s") for c in cells if c["method"] == m and c["ratio"] == r)
            if seconds and full_s:
                cost.setdefault(m, []).append({"ratio": r, "compaction_s": seconds, "full_request_s": full_s})
    return {"threshold_pct": threshold, "within": within, "am": am, "versus": versus, "ratios": ratios, "cost": cost,
            "scope": scope, "texts": sorted({c["text"] for c in cells})}


def fidelity_lines(ans: dict) -> list[str]:
    """Markdown: the 2 % answer, then AM vs each other method at the same budget."""
    texts = ans.get("texts", [])
    lines = [f"Means over the {len(texts)} TEST-set texts (never tuned on): {', '.join(texts)}." if ans.get("scope") == "test"
             else f"Means over all {len(texts)} texts of the run (none from the TEST set)."] if texts else []
    for m, w in ans["within"].items():
        if w["ratio"] is None:
            lines.append(f"- **{m}** is not within {ans['threshold_pct']:g} % ΔNLL of full context at any tested ratio.")
        else:
            lines.append(f"- **{m}** stays within {ans['threshold_pct']:g} % ΔNLL of full context down to ratio "
                         f"**{w['ratio']:g}** ({w['delta_nll_pct']:+.2f} %).")
    for m, rows in ans.get("cost", {}).items():
        lines.append(f"- **{m}** compaction took " + ", ".join(f"{x['compaction_s']:.2f} s at r={x['ratio']:g}" for x in rows)
                     + f", next to {rows[0]['full_request_s']:.2f} s for the whole full-context request (prefill of "
                     "document + continuation); the speed suite measures this per context length.")
    if ans["am"] and ans["versus"]:
        am = ans["am"]
        rows = []
        for other, v in ans["versus"].items():
            cells = {x["ratio"]: x for x in v["cells"]}
            rows.append([other, f"{v['am_lower_kl']}/{v['of']}", f"{v['am_lower_dnll']}/{v['of']}"] + [
                (f"{fmt(cells[r]['kl_reduction_pct'], '+.0f')} % / {cells[r]['dnll_gain_pp']:+.2f} pp" if r in cells else "–")
                for r in ans["ratios"]])
        from .output import table

        lines += ["", (f"{am} against each other method at the same budget — cell: KL lower by (%) / ΔNLL lower by "
                  "(percentage points); positive means AM is better:"), "",
                  *table(["vs", "AM lower KL", "AM lower ΔNLL"] + [f"r={r:g}" for r in ans["ratios"]], rows)]
    return lines


def speed(result: dict) -> dict:
    """Per context length and method: compaction seconds as a fraction of prefill seconds, and the
    decode step time compacted vs stock."""
    out = []
    for row in result["rows"]:
        for m, c in row["compacted"].items():
            out.append({
                "tokens": row["tokens"], "method": m,
                "compaction_share": c["compaction_s"] / row["stock"]["prefill_s"] if row["stock"]["prefill_s"] else None,
                "tpot_ratio": (c["tpot_s"] / row["stock"]["tpot_s"]) if c.get("tpot_s") and row["stock"].get("tpot_s") else None,
            })
    return {"rows": out}


def speed_lines(ans: dict) -> list[str]:
    lines = []
    for m in dict.fromkeys(r["method"] for r in ans["rows"]):
        rows = [r for r in ans["rows"] if r["method"] == m]
        lines.append(f"- **{m}**: compaction costs " + ", ".join(
            f"{fmt(100 * r['compaction_share'] if r['compaction_share'] is not None else None, '.0f')} % of the prefill "
            f"at {r['tokens']} tokens" for r in rows) + "; a compacted request's decode step takes " + ", ".join(
            f"{fmt(r['tpot_ratio'], '.2f')}×" for r in rows) + " the stock request's at the same lengths.")
    return lines


def memory(result: dict) -> dict:
    """Per mode: the most concurrent requests that ran with no preemption, and blocks held per request."""
    out = {}
    for mode in dict.fromkeys(r["mode"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["mode"] == mode and not r.get("errors")]
        clean = [r for r in rows if r["preemptions"] == 0]
        best = max(clean, key=lambda r: (r["peak_running"], r["concurrency"]), default=None)
        out[mode] = {
            "max_running_without_preemption": best["peak_running"] if best else 0,
            "at_concurrency": best["concurrency"] if best else None,
            "first_preempting_concurrency": min((r["concurrency"] for r in rows if r["preemptions"] > 0), default=None),
            "peak_blocks_per_request": mean(r["peak_blocks_held"] for r in rows if r["concurrency"] == 1),
            "blocks_after_compaction": mean(r["peak_blocks_held"] - r["blocks_freed"] for r in rows
                                            if r["concurrency"] == 1 and r.get("compactions") and r.get("blocks_freed")),
        }
    return {"pool_blocks": result.get("pool_blocks"), "modes": out}


def memory_lines(ans: dict) -> list[str]:
    lines = []
    for mode, v in ans["modes"].items():
        first = v["first_preempting_concurrency"]
        lines.append(f"- **{mode}**: up to **{v['max_running_without_preemption']}** requests ran at once without "
                     f"preemption in a {ans['pool_blocks']}-block pool"
                     + (f"; preemption started at {first} concurrent requests" if first else "; no preemption at any level")
                     + (f"; one request alone held {v['peak_blocks_per_request']:.0f} blocks at its peak"
                        if v["peak_blocks_per_request"] is not None else "")
                     + (f" and {v['blocks_after_compaction']:.0f} once compacted" if v.get("blocks_after_compaction") else "") + ".")
    return lines
