"""The benchmark CLI's pure parts, without a server: arguments, stamping, scoring, tables, answers, README update."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import cli, update_readme
from benchmarks.common import answers, corpus, output, scoring, sets, texts
from benchmarks.common.stamp import describe, stamp
from benchmarks.suites import fidelity, memory, speed


def _meta():
    return stamp(["run", "--suite", "fidelity"])


def _fidelity_result():
    """Two texts; AM within 2 % at 0.5 and 0.2 only; snapkv always worse; summary much worse."""
    dnll = {"highest_attention": {0.5: 0.8, 0.2: 1.9, 0.1: 3.0}, "omp": {0.5: 0.7, 0.2: 2.5, 0.1: 2.9},
            "snapkv": {0.5: 1.2, 0.2: 4.0, 0.1: 6.0}, "summary": {0.5: 30.0, 0.2: 35.0, 0.1: 40.0}}
    cells = []
    for text in ("GPL-3", "Apache-2.0"):
        for method, by_ratio in dnll.items():
            for ratio, value in by_ratio.items():
                cells.append({"text": text, "method": method, "ratio": ratio, "delta_nll_pct": value, "kl": value / 100,
                              "top1_agreement": 1 - value / 100, "kept": int(1024 * ratio), "compaction_s": 0.5,
                              "summary_tokens": 100 if method == "summary" else None, "summary_s": 1.0, "mode": "summary"})
    cfg = fidelity.Config(texts=["GPL-3", "Apache-2.0"], ratios=[0.5, 0.2, 0.1],
                          methods=["highest_attention", "omp", "snapkv", "summary"])
    return {"suite": "fidelity", "quick": False, "meta": _meta(), "config": cfg.model_dump(), "block_size": 128,
            "full_context": {"GPL-3": {"doc_tokens": 1024, "cont_tokens": 256, "request_s": 3.0}}, "cells": cells}


def _speed_result():
    rows = [{"tokens": n, "stock": {"prefill_s": n / 100, "vllm_prefill_s": n / 110, "tpot_s": 0.02 + n / 1e6, "ttft_s": n / 100},
             "compacted": {"highest_attention": {"compaction_s": n / 400, "compaction_share": 0.25, "kv_entries": n // 10,
                                                 "ttft_s": n / 80, "tpot_s": 0.02}}} for n in (1024, 2048)]
    return {"suite": "speed", "quick": False, "meta": _meta(), "config": speed.Config().model_dump(), "block_size": 128,
            "rows": rows}


def _memory_result():
    rows = []
    for mode, fits in (("stock", 2), ("compacted", 8)):
        for k in (1, 2, 4, 8):
            rows.append({"mode": mode, "concurrency": k, "peak_running": min(k, fits), "peak_waiting": max(0, k - fits),
                         "preemptions": 0 if k <= fits else 3, "peak_blocks_held": 9 * min(k, fits) if mode == "stock" else 5 + 2 * (k - 1),
                         "peak_kv_usage": 0.5, "compactions": k if mode == "compacted" else 0, "wall_s": 10.0,
                         "blocks_freed": 3 * k if mode == "compacted" else 0,
                         "output_tokens_per_s": 5.0, "errors": 0})
    return {"suite": "memory", "quick": False, "meta": _meta(), "config": memory.Config(block_size=128).model_dump(),
            "pool_blocks": 32, "block_size": 128, "rows": rows}


def test_run_arguments_take_quick_sizes_and_overrides():
    args = cli.build_parser().parse_args(["run", "--suite", "fidelity", "--quick", "--ratios", "0.3", "0.05"])
    cfg = cli.config_for("fidelity", args)
    assert cfg.ratios == [0.3, 0.05] and cfg.texts == fidelity.QUICK["texts"] and cfg.doc_tokens == fidelity.QUICK["doc_tokens"]
    full = cli.config_for("fidelity", cli.build_parser().parse_args(["run", "--suite", "all"]))
    assert full.ratios == [0.2, 0.1, 0.05, 0.02] and "summary_am" in full.methods and "tova" in full.methods
    assert set(full.texts) == set(corpus.DEV + corpus.TEST) and "paper" in full.presets  # the corpus, both sets
    assert cfg.presets == []  # --quick starts no preset servers
    assert cli.config_for("speed", cli.build_parser().parse_args(["run", "--suite", "speed"])).lengths[-1] + 64 <= 8192


def test_the_speed_suite_can_time_a_preset_on_its_own_server():
    cfg = cli.config_for("speed", cli.build_parser().parse_args(["run", "--suite", "speed", "--speed-preset", "fast"]))
    assert speed.spec(cfg).name == "preset-fast"
    assert speed._cases(cfg) == {"preset fast": {}}  # only am_ratio is sent: the preset's options apply
    plain = cli.config_for("speed", cli.build_parser().parse_args(["run", "--suite", "speed"]))
    assert speed.spec(plain) == fidelity.SPEC and speed._cases(plain)["highest_attention"]["am_method"] == "highest_attention"


@pytest.mark.parametrize("argv", [
    ["run", "--suite", "fidelity", "--methods", "nonsense"],
    ["run", "--suite", "fidelity", "--ratios", "1.5"],
    ["run", "--suite", "speed", "--lengths", "8192"],
    ["run", "--suite", "memory", "--pool-tokens", "512", "--prompt-tokens", "1024"],
])
def test_bad_options_stop_before_any_server_starts(argv):
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(SystemExit):
        cli.config_for(args.suite, args)


def test_unknown_suite_is_refused():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "--suite", "everything"])


def test_stamp_names_machine_versions_commit_and_command():
    meta = _meta()
    assert meta["command"] == "python -m benchmarks run --suite fidelity"
    assert {"cpu", "cpu_count", "gpu", "platform"} <= set(meta["machine"])
    assert {"python", "torch", "vllm", "plugin"} <= set(meta["versions"])
    assert "commit" in meta["git"]
    assert "Python" in describe(meta)


def test_score_of_identical_rows_is_zero_and_shifted_context_is_aligned():
    rows = [None, {5: -0.1, 6: -2.5}, {6: -0.2, 5: -1.9}]
    same = scoring.score(rows, rows, [5, 6], 1, 1, top=2)
    assert same["kl"] == 0 and same["delta_nll_pct"] == 0 and same["top1_agreement"] == 1
    shorter = [{5: -0.1, 6: -2.5}, {6: -0.7, 5: -0.9}]  # same continuation after a one-token context
    worse = scoring.score(rows, shorter, [5, 6], 1, 0, top=2)
    assert worse["delta_nll_pct"] > 0 and worse["kl"] > 0 and worse["top1_agreement"] == 1


def test_kept_entries_follow_the_engine_layout():
    assert fidelity.kept_entries(1024, 0.1, 4, 128) == 4 + 102
    assert fidelity.kept_entries(300, None, 4, 128, target=20) == 4 + 20 + 44  # raw tail after the last block


def test_fidelity_answers_and_tables():
    result = _fidelity_result()
    ans = answers.fidelity(result)
    assert ans["within"]["highest_attention"] == {"ratio": 0.2, "delta_nll_pct": 1.9}
    assert ans["within"]["omp"]["ratio"] == 0.5
    snap = ans["versus"]["snapkv"]
    assert snap["am_lower_kl"] == snap["of"] == 3
    assert snap["cells"][0]["kl_reduction_pct"] == pytest.approx(100 * (1 - 0.8 / 1.2))
    assert snap["cells"][0]["dnll_gain_pp"] == pytest.approx(0.4)
    md = fidelity.markdown(result)
    assert "down to ratio **0.2**" in md and "| snapkv |" in md and "## Summaries" in md


def test_speed_and_memory_tables_and_answers():
    s = answers.speed(_speed_result())
    assert s["rows"][0]["compaction_share"] == pytest.approx(0.25)
    assert "25 % of the prefill at 1024 tokens" in speed.markdown(_speed_result())
    m = answers.memory(_memory_result())
    assert m["modes"]["stock"]["max_running_without_preemption"] == 2
    assert m["modes"]["compacted"]["max_running_without_preemption"] == 8
    assert m["modes"]["stock"]["first_preempting_concurrency"] == 4
    assert m["modes"]["stock"]["peak_blocks_per_request"] == 9 and m["modes"]["stock"]["blocks_after_compaction"] is None
    assert m["modes"]["compacted"]["peak_blocks_per_request"] == 5
    assert m["modes"]["compacted"]["blocks_after_compaction"] == 2
    assert "up to **8** requests" in memory.markdown(_memory_result()) and "and 2 once compacted" in memory.markdown(_memory_result())


def test_results_are_written_and_the_readme_is_regenerated(tmp_path):
    result = _fidelity_result()
    paths = output.write(result, output.stem("fidelity", False), fidelity.markdown(result), None, tmp_path)
    assert json.loads(paths["json"].read_text())["meta"]["command"].startswith("python -m benchmarks")
    assert output.stem("speed", True) == "speed_quick"
    output.write(_memory_result(), "memory_latest", "", None, tmp_path)
    (tmp_path / "prefix_reuse_latest.md").write_text("# title\n\n| a |\n|---|\n| 1 |\n")
    sections = update_readme.sections(tmp_path, "<!-- BEGIN prefix_reuse -->\n<!-- END prefix_reuse -->")
    assert sections["prefix_reuse"] == "| a |\n|---|\n| 1 |"
    assert "stays within 2 % ΔNLL" in sections["fidelity"] and "compaction took 0.50 s" in sections["fidelity"] and "fidelity_latest.png" in sections["fidelity"]
    assert "Not measured yet" in sections["speed"] and "--suite speed" in sections["speed"]
    assert "up to **8** requests" in sections["memory"]
    readme = "intro\n<!-- BEGIN fidelity -->\nold\n<!-- END fidelity -->\nrest\n"
    new = update_readme.replace(readme, {"fidelity": "new"})
    assert new == "intro\n<!-- BEGIN fidelity -->\nnew\n<!-- END fidelity -->\nrest\n"
    empty = "<!-- BEGIN fidelity -->\n<!-- END fidelity -->\n"
    assert update_readme.replace(empty, {"fidelity": "a\nb"}) == "<!-- BEGIN fidelity -->\na\nb\n<!-- END fidelity -->\n"
    assert update_readme.replace(new, {"fidelity": ""}) == "intro\n" + empty + "rest\n"
    with pytest.raises(SystemExit):
        update_readme.replace(readme, {"speed": "x"})


def test_the_headline_shows_its_first_study_s_plot_after_its_table(tmp_path):
    """The README's one figure is regenerated with it (it was once dropped by a rewrite of the block)."""
    stem = update_readme.CORPUS_RESULTS[0]
    result = update_readme._with_stem(output.read(stem), stem)
    assert not any(line.startswith("![") for line in update_readme.headline_block([result], tmp_path))  # no plot file
    (tmp_path / f"{stem}.png").write_bytes(b"")
    lines = update_readme.headline_block([result, result], tmp_path)
    images = [i for i, line in enumerate(lines) if line.startswith("![")]
    tables = [i for i, line in enumerate(lines) if line.startswith("| preset |")]
    assert len(images) == 1 and tables[0] < images[0] < tables[1]
    assert lines[images[0]].endswith(f"]({update_readme.LINK}/{stem}.png)")
    readme = (update_readme.ROOT / "README.md").read_text()
    assert f"]({update_readme.LINK}/{stem}.png)" in readme and (output.RESULTS / f"{stem}.png").exists()


def test_the_real_pages_have_every_generated_section():
    text = "\n".join(page.read_text() for page in update_readme.PAGES)
    for name in ("headline", "fidelity", "speed", "memory", "prefix_reuse", "online_ceiling", "query_sources"):
        assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text


def test_every_study_named_on_the_command_line_exists():
    import importlib.util

    for module in cli.STUDIES.values():
        assert importlib.util.find_spec(f"benchmarks.suites.{module}") is not None, module
    for suite in cli.SUITES:
        module = cli.suite_module(suite)
        assert hasattr(module, "Config") and hasattr(module, "QUICK") and hasattr(module, "markdown")


def test_corpus_split_is_written_out_disjoint_and_follows_its_rule():
    assert (corpus.DEV, corpus.TEST) == corpus._split()  # the written split is the documented rule
    assert not set(corpus.DEV) & set(corpus.TEST) and len(corpus.DEV + corpus.TEST) >= 10
    assert set(corpus.TUNED_BEFORE) <= set(corpus.DEV)  # texts tuned on before the split are spent
    kinds = {s: {corpus.get(n).kind for n in names} for s, names in corpus.SETS.items()}
    assert kinds["dev"] == kinds["test"] == set(corpus.KINDS) and len(corpus.KINDS) >= 5
    assert texts.expand(["test", "GPL-3", "MPL-2.0"]) == list(corpus.TEST) + ["GPL-3"]


def test_corpus_texts_load_and_a_missing_or_changed_file_fails_naming_the_text(tmp_path):
    for name in ("GPL-3", "sed-FAQ", "py-json-decoder", "bash-NEWS"):  # plain, gzip + from_line, stdlib, gzip
        assert len(texts.read(name)) > 4000
    assert texts.read("sed-FAQ").startswith("2. BASIC SED")
    missing = corpus.Text("gone", "prose", tmp_path / "nope.gz", "0" * 64)
    with pytest.raises(FileNotFoundError, match="'gone'"):
        missing.read()
    (tmp_path / "x.txt").write_text("other text")
    with pytest.raises(ValueError, match="'changed'.*differs"):
        corpus.Text("changed", "prose", tmp_path / "x.txt", "0" * 64).read()
    with pytest.raises(ValueError, match="dev, test or all"):
        corpus.names("train")


def _set_rows():
    """KL per text: AM 0.1 everywhere except one bad TEST text; h2o 0.2; snapkv 0.15 on TEST, 0.3 on DEV."""
    rows = []
    for text in ("MPL-2.0", "sed-FAQ", "GPL-3", "xz-FAQ"):
        test = text in corpus.TEST
        rows += [{"text": text, "method": "highest_attention", "ratio": 0.1, "kl": 0.4 if text == "sed-FAQ" else 0.1},
                 {"text": text, "method": "h2o", "ratio": 0.1, "kl": 0.2},
                 {"text": text, "method": "snapkv", "ratio": 0.1, "kl": 0.15 if test else 0.3}]
    return rows


def test_set_summaries_report_test_means_with_spread_and_dev_beside():
    summary = sets.per_set(_set_rows())
    am_test = summary["test"][("highest_attention", 0.1)]
    assert am_test["n"] == 2 and am_test["mean"] == pytest.approx(0.25) and (am_test["min"], am_test["max"]) == (0.1, 0.4)
    assert am_test["ci"][0] >= 0.1 and am_test["ci"][1] <= 0.4
    assert summary["dev"][("highest_attention", 0.1)]["mean"] == pytest.approx(0.1)
    assert sets.best_baseline(summary["test"], 0.1) == ("snapkv", 0.15)
    assert sets.best_baseline(summary["dev"], 0.1) == ("h2o", 0.2)
    md = "\n".join(sets.lines(_set_rows()))
    assert md.index("TEST set") < md.index("DEV set")  # the reported set first
    assert "0.250 [0.100–0.400]" in md and "+66.7 % vs snapkv" in md and "-50.0 % vs h2o" in md
    assert sets.bootstrap([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_fidelity_answers_stand_on_the_test_set_when_the_run_has_one():
    result = _fidelity_result()
    result["cells"] = [dict(c, text="MPL-2.0" if c["text"] == "GPL-3" else c["text"]) for c in result["cells"]]
    for c in result["cells"]:
        if c["text"] == "Apache-2.0":
            c["kl"] = 1.0  # a DEV text that must not enter the answers
    ans = answers.fidelity(result)
    assert ans["scope"] == "test" and ans["texts"] == ["MPL-2.0"]
    assert ans["versus"]["snapkv"]["cells"][0]["kl_am"] == pytest.approx(0.008)
    md = fidelity.markdown(result)
    assert "TEST-set texts (never tuned on): MPL-2.0" in md and "DEV set" in md


def test_offline_merge_keeps_only_texts_measured_with_every_cell():
    from benchmarks.suites import offline

    rows = [{"text": t, "source": "context", "method": m, "ratio": r}
            for t in ("GPL-3", "MPL-2.0") for m in ("h2o", "omp") for r in (0.1, 0.05)]
    rows = [r for r in rows if not (r["text"] == "MPL-2.0" and r["method"] == "omp" and r["ratio"] == 0.05)]
    kept, dropped = offline.complete_texts(rows)
    assert dropped == ["MPL-2.0"] and {r["text"] for r in kept} == {"GPL-3"} and len(kept) == 4
