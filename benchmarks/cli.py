"""``python -m benchmarks``: one command for every benchmark.

    python -m benchmarks run --suite fidelity|speed|memory|kernels|all [--quick] [--url URL --model NAME]
    python -m benchmarks readme                      # README results from benchmarks/results/*_latest.json
    python -m benchmarks offline|recall|on-policy|prefix-reuse|load|query-sources|online-ceiling|stall|capture-memory|workload [...]

``run`` starts the server each suite needs (one at a time) unless ``--url`` names one, shows a progress
bar, and writes ``benchmarks/results/<suite>_latest.{json,md,png}`` (``<suite>_quick.*`` with ``--quick``),
stamped with the machine, versions, git commit and the exact command.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time

from pydantic import ValidationError

from .common import output
from .common.stamp import stamp

SUITES = ("fidelity", "speed", "memory", "kernels")
#: other studies, forwarded as ``python -m benchmarks <name> [args]`` to ``benchmarks.suites.<module>.main``
STUDIES = {"offline": "offline", "recall": "recall", "on-policy": "on_policy", "prefix-reuse": "prefix_reuse", "load": "load",
           "query-sources": "query_sources", "online-ceiling": "online_ceiling", "stall": "stall",
           "capture-memory": "capture_memory", "workload": "workload"}
#: suite → {Config field: argparse destination}
FIELDS = {
    "fidelity": {"texts": "texts", "ratios": "ratios", "methods": "methods", "doc_tokens": "doc_tokens",
                 "cont_tokens": "cont_tokens", "top": "top", "summary_factor": "summary_factor", "presets": "presets"},
    "speed": {"lengths": "lengths", "methods": "speed_methods", "ratio": "speed_ratio", "decode_tokens": "decode_tokens",
              "repeats": "repeats", "queries": "speed_queries", "preset": "speed_preset"},
    "memory": {"pool_tokens": "pool_tokens", "prompt_tokens": "prompt_tokens", "gen_tokens": "gen_tokens",
               "concurrency": "concurrency", "ratio": "memory_ratio", "method": "memory_method"},
    "kernels": {"kernels": "kernels", "seq_lens": "seq_lens"},
}


def suite_module(name: str):
    return importlib.import_module(f"benchmarks.suites.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run benchmark suites", description="Run benchmark suites; options left out take "
                         "the suite's full defaults, or its tiny --quick sizes.")
    run.add_argument("--suite", required=True, choices=[*SUITES, "all"])
    run.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few minutes on 2 CPU cores")
    run.add_argument("--url", help="use this running server instead of starting one (fidelity, speed, memory)")
    run.add_argument("--model", default="smollm2", help="served model name at --url")
    run.add_argument("--tag", help="results file suffix (default: latest, or quick with --quick)")
    run.add_argument("--update-readme", action="store_true", help="regenerate the README's results afterwards")

    f = run.add_argument_group("fidelity")
    f.add_argument("--texts", nargs="+", help="corpus names (benchmarks/common/corpus.py), dev | test | all, licence names "
                   "or paths (default: dev test)")
    f.add_argument("--presets", nargs="*", help="presets each served by its own server and scored (default: all "
                   "bundled; none with --quick)")
    f.add_argument("--ratios", nargs="+", type=float)
    f.add_argument("--methods", nargs="+", help="AM, eviction and text methods (see benchmarks/suites/fidelity.py)")
    f.add_argument("--doc-tokens", type=int, help="document tokens (a multiple of the KV block size)")
    f.add_argument("--cont-tokens", type=int, help="continuation tokens scored after the document")
    f.add_argument("--top", type=int, help="top-k of the prompt logprobs (KL@k)")
    f.add_argument("--summary-factor", type=float, help="summary_am: summarise to this × budget, then compact")

    s = run.add_argument_group("speed")
    s.add_argument("--lengths", nargs="+", type=int, help="context lengths in tokens")
    s.add_argument("--speed-methods", nargs="+")
    s.add_argument("--speed-ratio", type=float)
    s.add_argument("--speed-preset", help="serve this bundled preset and time its compactions (instead of "
                   "--speed-methods: requests send only am_ratio)")
    s.add_argument("--speed-queries", choices=("context", "repeat", "self_study"),
                   help="reference-query source of the compacted requests (am_queries; default context)")
    s.add_argument("--decode-tokens", type=int, help="output tokens per request (decode step timing)")
    s.add_argument("--repeats", type=int)

    m = run.add_argument_group("memory")
    m.add_argument("--pool-tokens", type=int, help="KV pool size in tokens (rounded down to whole blocks)")
    m.add_argument("--prompt-tokens", type=int)
    m.add_argument("--gen-tokens", type=int)
    m.add_argument("--concurrency", nargs="+", type=int, help="requests sent at once, one level after another")
    m.add_argument("--memory-ratio", type=float)
    m.add_argument("--memory-method")

    k = run.add_argument_group("kernels (CUDA; TRITON_INTERPRET=1 for a CPU smoke check)")
    k.add_argument("--kernels", nargs="+")
    k.add_argument("--seq-lens", nargs="+", type=int)

    sub.add_parser("readme", help="regenerate the README's results from benchmarks/results/*_latest.json")
    for name, module in STUDIES.items():
        sub.add_parser(name, help=f"benchmarks/suites/{module}.py (arguments: python -m benchmarks {name} --help)")
    return parser


def config_for(name: str, args: argparse.Namespace):
    """The suite's Config: full defaults, or its QUICK sizes, overridden by what was given on the command line."""
    module = suite_module(name)
    values = dict(module.QUICK) if args.quick else {}
    values.update({key: getattr(args, dest) for key, dest in FIELDS[name].items() if getattr(args, dest) is not None})
    try:
        return module.Config(**values)
    except ValidationError as exc:
        raise SystemExit(f"--suite {name}: {exc}") from exc


def run_suites(args: argparse.Namespace) -> list[dict]:
    from tqdm import tqdm

    from .common.serving import Servers

    names = list(SUITES) if args.suite == "all" else [args.suite]
    configs = {n: config_for(n, args) for n in names}  # every suite's options are checked before any server starts
    run_id = f"bench-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}"
    written = []
    with Servers(args.url, args.model) as servers:
        for name in names:
            module, cfg = suite_module(name), configs[name]
            endpoint = servers.get(module.spec(cfg)) if hasattr(module, "spec") else None
            # Described now: a suite may go on to other servers (fidelity's presets), stopping this one.
            server_info = endpoint.describe() if endpoint else None
            meta = stamp()
            with tqdm(total=module.steps(cfg), desc=name, unit="cell") as bar:
                try:
                    extra = {"servers": servers} if "servers" in inspect.signature(module.run).parameters else {}
                    data = module.run(cfg, endpoint, run_id, bar, **extra)
                except getattr(module, "Skipped", ()) as exc:
                    print(exc)
                    continue
            result = {"suite": name, "quick": args.quick, "meta": meta,
                      "server": server_info, "config": cfg.model_dump(), **data}
            markdown = module.markdown(result)
            paths = output.write(result, output.stem(name, args.quick, args.tag), markdown, module.plot)
            print(markdown)
            print("wrote " + ", ".join(str(p) for p in paths.values()))
            written.append(result)
    return written


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STUDIES:
        return suite_module(STUDIES[argv[0]]).main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "readme":
        from . import update_readme

        return update_readme.main()
    run_suites(args)
    if args.update_readme:
        from . import update_readme

        update_readme.main()
    return 0
