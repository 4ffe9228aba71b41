"""The figures of each suite (matplotlib, Agg backend, PNG next to the JSON).

Why one module: the same conventions everywhere — AM methods drawn thick, text baselines dashed, ratios
on a log axis with readable ticks — and matplotlib imported only when a figure is drawn.
"""

from __future__ import annotations

from pathlib import Path

AM = ("highest_attention", "omp")
TEXT = ("summary", "summary_am")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


EVICTION = ("h2o", "snapkv", "tova", "streaming", "truncate", "random")


def _style(method: str) -> dict:
    """AM methods, presets and named AM variants thick; summaries dashed; eviction baselines thin."""
    if method in TEXT:
        return {"lw": 1.6, "ls": "--", "marker": "s"}
    if method in EVICTION:
        return {"lw": 1.1, "marker": "."}
    return {"lw": 2.6, "marker": "o"}


def _ratio_axis(ax, ratios) -> None:
    ax.set_xscale("log")
    ax.set_xticks(sorted(ratios))
    ax.set_xticklabels([f"{r:g}" for r in sorted(ratios)])
    ax.minorticks_off()
    ax.set_xlabel("kept ratio (log)")
    ax.grid(alpha=0.3)


def _title(fig, result: dict, text: str) -> None:
    m = result["meta"]["machine"]
    device = m.get("gpu") or f"{m.get('usable_cores')} CPU cores"
    fig.suptitle(f"{text} — {device}, {result['meta']['utc'][:10]}{' (quick)' if result.get('quick') else ''}")


def _save(fig, path: Path, rect=None) -> None:
    """Lay out, write and close: every figure ends the same way."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**({"rect": rect} if rect else {}))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fidelity(result: dict, path: Path) -> None:
    """Mean over the texts of each corpus set (TEST first): ΔNLL, KL and top-1 agreement against the ratio."""
    from ..suites.fidelity import _methods, mean_cell
    from .sets import SET_ORDER, set_name

    plt = _pyplot()
    cfg = result["config"]
    present = [s for s in SET_ORDER if any(set_name(c["text"]) == s for c in result["cells"])]
    panels = (("delta_nll_pct", "ΔNLL of continuation (% of full)"), ("kl", f"KL@{cfg['top']}(full ‖ reduced) per token"),
              ("top1_agreement", "teacher-forced top-1 agreement"))
    fig, axes = plt.subplots(len(present), 3, figsize=(16.5, 4.4 * len(present)), squeeze=False)
    for row, set_ in zip(axes, present):
        cells = [c for c in result["cells"] if set_name(c["text"]) == set_]
        n_texts = len({c["text"] for c in cells})
        for method in _methods(result):
            ratios = [r for r in cfg["ratios"] if mean_cell(cells, method, r, "kl") is not None]
            if not ratios:
                continue
            for ax, (key, _) in zip(row, panels):
                ax.plot(ratios, [mean_cell(cells, method, r, key) for r in ratios], label=method, **_style(method))
        for ax, (key, label) in zip(row, panels):
            _ratio_axis(ax, cfg["ratios"])
            ax.set_ylabel(label)
            ax.set_title(f"{set_.upper()} set, mean over {n_texts} texts", fontsize=9)
        row[0].axhline(2.0, color="grey", lw=0.8, ls=":")
        row[1].set_yscale("log")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=8)
    _title(fig, result, f"Fidelity vs kept ratio ({len(cfg['texts'])} texts, document {cfg['doc_tokens']} tokens)")
    _save(fig, path, rect=(0, 0, 0.88, 1))


def speed(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = result["rows"]
    lengths = [r["tokens"] for r in rows]
    methods = list(rows[0]["compacted"]) if rows else []
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    left.plot(lengths, [r["stock"]["prefill_s"] for r in rows], marker="o", color="black", label="prefill (stock TTFT)")
    for m in methods:
        left.plot(lengths, [r["compacted"][m]["compaction_s"] for r in rows], label=f"compaction, {m}", **_style(m))
    left.set_ylabel("seconds")
    right.plot(lengths, [_ms(r["stock"]["tpot_s"]) for r in rows], marker="o", color="black", label="stock")
    for m in methods:
        right.plot(lengths, [_ms(r["compacted"][m]["tpot_s"]) for r in rows], label=f"compacted r={result['config']['ratio']}, {m}",
                   **_style(m))
    right.set_ylabel("decode ms / output token")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(x) for x in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _title(fig, result, "Compaction vs prefill time, and decode step time")
    _save(fig, path)


def _ms(seconds):
    return None if seconds is None else 1e3 * seconds


def memory(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    for mode in dict.fromkeys(r["mode"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        ks = [r["concurrency"] for r in rows]
        left.plot(ks, [r["peak_running"] for r in rows], marker="o", label=f"{mode}: peak running")
        left.plot(ks, [r["preemptions"] for r in rows], marker="x", ls="--", label=f"{mode}: preemptions")
        right.plot(ks, [r["peak_blocks_held"] for r in rows], marker="o", label=mode)
    right.axhline(result["pool_blocks"], color="grey", lw=0.8, ls=":", label="pool")
    left.set_ylabel("requests")
    right.set_ylabel("peak KV blocks held")
    for ax in (left, right):
        ax.set_xlabel("requests sent at once")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _title(fig, result, f"Long requests in a {result['pool_blocks']}-block KV pool")
    _save(fig, path)


def kernels(result: dict, path: Path) -> None:
    plt = _pyplot()
    rows = [r for r in result["results"] if "triton_ms" in r]
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for variant in dict.fromkeys(str(r.get("splits", "")) for r in rows if r["kernel"] == name):
            sub = [r for r in rows if r["kernel"] == name and str(r.get("splits", "")) == variant]
            label = f" splits={variant}" if variant else ""
            ax.plot([r["T"] for r in sub], [r["triton_ms"] for r in sub], marker="o", label="triton" + label)
            if any("torch_ms" in r for r in sub):
                ax.plot([r["T"] for r in sub], [r.get("torch_ms") for r in sub], marker="x", ls="--", label="reference" + label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("KV tokens")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _title(fig, result, "Triton kernels vs references")
    _save(fig, path)


def offline(rows: list[dict], path: Path, methods) -> None:
    """Algorithm-level fidelity: mean continuation KL over the texts of each corpus set vs ratio (shaded:
    min–max over texts), one panel per (set, query source); TEST first."""
    from .sets import SET_ORDER, set_name

    plt = _pyplot()
    present = {(set_name(r["text"]), r["source"]) for r in rows}
    keys = sorted(present, key=lambda k: (SET_ORDER.index(k[0]), k[1]))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.4), squeeze=False)
    for ax, (set_, source) in zip(axes[0], keys):
        sub = [r for r in rows if set_name(r["text"]) == set_ and r["source"] == source]
        n_texts = len({r["text"] for r in sub})
        for m in methods:
            ratios = sorted({r["ratio"] for r in sub if r["method"] == m})
            if not ratios:
                continue
            vals = [[r["kl"] for r in sub if r["method"] == m and r["ratio"] == x] for x in ratios]
            line = ax.plot(ratios, [sum(v) / len(v) for v in vals], label=m, **_style(m))[0]
            if n_texts > 1:
                ax.fill_between(ratios, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(),
                                alpha=0.08)
        _ratio_axis(ax, {r["ratio"] for r in sub})
        ax.set_yscale("log")
        ax.set_ylabel("continuation KL(full‖compacted), mean over texts")
        ax.set_title(f"{set_.upper()} set ({n_texts} texts) · {source} queries")
    axes[0][0].legend(fontsize=7)
    _save(fig, path)


def workload(result: dict, path: Path) -> None:
    """Wall time and output tokens/s of each workload, stock beside compaction and its eviction baseline."""
    plt = _pyplot()
    workloads = list(dict.fromkeys(r["workload"] for r in result["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, label in zip(axes, ("wall_s", "output_tokens_per_s"), ("wall time (s)", "output tokens/s")):
        for w, name in enumerate(workloads):
            rows = [r for r in result["rows"] if r["workload"] == name]
            width = 0.8 / len(rows)
            for i, r in enumerate(rows):
                bar = ax.bar(w + (i - (len(rows) - 1) / 2) * width, r[key] or 0, width,
                             color={"stock": "grey", "compacted": "tab:blue"}.get(r["mode"], "tab:orange"))
                ax.annotate(r["mode"], (bar[0].get_x() + width / 2, 0), rotation=90, ha="center", va="bottom",
                            fontsize=7, color="white")
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    _title(fig, result, f"Workloads in a {result['pool_blocks']}-block KV pool: stock vLLM vs compaction")
    _save(fig, path)
