"""The benchmark CLI's pure parts, without a server: arguments, stamping, scoring, tables, answers, README update."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import answers, cli, fidelity, memory, output, scoring, speed, update_readme
from benchmarks.stamp import describe, stamp


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
    assert full.ratios == [0.5, 0.2, 0.1, 0.05, 0.02] and "summary_am" in full.methods
    assert cli.config_for("speed", cli.build_parser().parse_args(["run", "--suite", "speed"])).lengths[-1] + 64 <= 8192


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


def test_the_real_pages_have_every_generated_section():
    text = "\n".join(page.read_text() for page in update_readme.PAGES)
    for name in ("headline", "fidelity", "speed", "memory", "prefix_reuse", "online_ceiling", "query_sources"):
        assert f"<!-- BEGIN {name} -->" in text and f"<!-- END {name} -->" in text


def test_every_study_named_on_the_command_line_exists():
    import importlib.util

    for module in cli.STUDIES.values():
        assert importlib.util.find_spec(f"benchmarks.{module}") is not None, module
    for suite in cli.SUITES:
        module = cli.suite_module(suite)
        assert hasattr(module, "Config") and hasattr(module, "QUICK") and hasattr(module, "markdown")
