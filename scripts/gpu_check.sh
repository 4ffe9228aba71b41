#!/usr/bin/env bash
# The GPU check (issue 13.1): one prepared command for a machine with one CUDA GPU, torch, Triton and pytest,
# and nothing else — no vLLM, no network, no install (a copy of this repository is enough).
#
#   bash scripts/gpu_check.sh            # ≤ 8 minutes on one H100/H200 (GPU_CHECK_BUDGET_S, default 450 s,
#                                        # bounds all steps together; each step also has its own limit)
#
# It runs, on CUDA:
#   1. the algorithm and executor tests (tests/algorithms) — every test takes the `device` fixture, so each
#      runs on cpu and cuda, in fp32 / bf16 / fp16 where the model dtype matters; tests that need the
#      bundled model or vLLM skip cleanly;
#   2. the kernel tests (tests/kernels) compiled for the GPU (ATTNMATCH_KERNEL_TEST_DEVICE=cuda), fp32 / bf16 /
#      fp16 cases as parametrised there;
#   3. the per-component compaction cost (benchmarks/suites/compaction_cost.py) on CUDA in bf16;
#   4. the kernel benchmark (benchmarks/suites/kernels.py) in bf16 and fp16, T = 4096 and 16384;
# and writes benchmarks/results/gpu_check_latest.{json,md} (device named) next to the step outputs
# (gpu_check_kernels_{bf16,fp16}.json, compaction_cost_gpu_check_cuda_bf16.{json,md}, gpu_check_logs/).
# Every step has its own time limit and the script goes on after a failing step; it exits non-zero if any
# step failed.
set -u
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The interpreter: $PYTHON, else the first of python3 / python / the repository's .venv whose torch sees a
# GPU, else the first that has torch at all (the environment step then says what is missing).
PY="${PYTHON:-}"
for probe in "import torch; assert torch.cuda.is_available()" "import torch"; do
  [ -n "$PY" ] && break
  for candidate in python3 python "$ROOT/.venv/bin/python"; do
    if "$candidate" -c "$probe" > /dev/null 2>&1; then PY="$candidate"; break; fi
  done
done
PY="${PY:-python3}"
RESULTS="${GPU_CHECK_RESULTS:-$ROOT/benchmarks/results}"  # override only for dry runs
LOGS="$RESULTS/gpu_check_logs"
mkdir -p "$LOGS"
# The repository as if installed (its root on sys.path), in this process and every subprocess;
# vLLM blocked so nothing in the selection can lean on it even where it happens to be installed.
export PYTHONPATH="$ROOT/scripts/gpu_check_env${PYTHONPATH:+:$PYTHONPATH}"
export ATTNMATCH_BLOCK_VLLM=1
unset TRITON_INTERPRET
STEPS_FILE="$LOGS/steps.tsv"
: > "$STEPS_FILE"
FAILED=0
START=$(date +%s)

BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"  # all steps together; the summary follows (the whole check stays < 8 min)
DEADLINE=$((START + BUDGET_S))

step() {  # step NAME LIMIT_S COMMAND...  (the limit is cut to what is left of the budget)
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s) rc left
  left=$((DEADLINE - t0 - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: skipped, the time budget is spent"
    printf '%s\t%s\t%s\t%s\n' "$name" 124 0 "skipped (budget spent): $*" >> "$STEPS_FILE"
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  rc=$?
  local t1=$(date +%s)
  tail -n 3 "$LOGS/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((t1 - t0))" "$*" >> "$STEPS_FILE"
  [ "$rc" -eq 0 ] || FAILED=1
  echo "--- $name: rc=$rc in $((t1 - t0))s"
}

step environment 30 "$PY" - <<'EOF'
import importlib.util, sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
import triton, vllm_attnmatch.kernels as k
print("triton", triton.__version__, "kernels from", k.__file__, "triton_available(cuda)", k.triton_available("cuda"))
assert importlib.util.find_spec("pytest") is not None, "pytest is missing"
try:
    import vllm  # noqa: F401
except ImportError:
    print("vLLM: not importable (as intended)")
else:
    raise SystemExit("vLLM is importable: the check must not depend on it")
EOF

PYTEST=("$PY" -m pytest -q -p no:cacheprovider -rs)
step algorithm_tests 150 "${PYTEST[@]}" tests/algorithms
step kernel_tests 150 env ATTNMATCH_KERNEL_TEST_DEVICE=cuda "${PYTEST[@]}" tests/kernels
step compaction_cost_cuda 60 "$PY" -m benchmarks.suites.compaction_cost --device cuda --dtype bf16 \
  --lengths 1024 2048 4096 --repeats 3 --tag gpu_check_cuda_bf16 --results "$RESULTS"
step kernel_bench_bf16 75 "$PY" benchmarks/suites/kernels.py --dtype bf16 --seq-lens 4096,16384 \
  --out "$RESULTS/gpu_check_kernels_bf16.json"
step kernel_bench_fp16 75 "$PY" benchmarks/suites/kernels.py --dtype fp16 --seq-lens 4096,16384 \
  --out "$RESULTS/gpu_check_kernels_fp16.json"
"$PY" - "$STEPS_FILE" "$RESULTS" "$START" <<'EOF'
"""Summarise the steps into gpu_check_latest.{json,md} (device named, last lines of each log)."""
import json, sys, time
from pathlib import Path

steps_file, results, start = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
try:
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
except Exception as exc:  # noqa: BLE001
    device, versions = f"torch unusable: {exc}", {}
try:
    import triton
    versions["triton"] = triton.__version__
except Exception:  # noqa: BLE001
    versions["triton"] = None
try:
    from benchmarks.common.stamp import stamp
    meta = stamp()
except Exception as exc:  # noqa: BLE001
    meta = {"error": str(exc)}
steps = []
for line in steps_file.read_text().splitlines():
    name, rc, seconds, command = line.split("\t", 3)
    log = steps_file.parent / f"{name}.log"
    tail = log.read_text(errors="replace").splitlines()[-12:] if log.exists() else []
    steps.append({"step": name, "rc": int(rc), "seconds": int(seconds), "command": command,
                  "ok": rc == "0", "log": str(log), "tail": tail})
result = {"suite": "gpu_check", "device": device, "versions": versions, "meta": meta,
          "total_seconds": int(time.time()) - start, "ok": all(s["ok"] for s in steps), "steps": steps}
(results / "gpu_check_latest.json").write_text(json.dumps(result, indent=1) + "\n")
lines = [f"# GPU check on {device}", "",
         f"`bash scripts/gpu_check.sh` · {meta.get('utc', '?')} · torch {versions.get('torch')}, CUDA "
         f"{versions.get('cuda')}, Triton {versions.get('triton')} · commit {(meta.get('git') or {}).get('commit')} · "
         f"{result['total_seconds']} s in all · {'all steps passed' if result['ok'] else 'SOME STEPS FAILED'}", "",
         "| step | result | seconds | last line |", "|---|---|---|---|"]
for s in steps:
    last = next((l for l in reversed(s["tail"]) if l.strip()), "").replace("|", "\\|")
    state = "ok" if s["ok"] else "skipped" if s["command"].startswith("skipped") else f"rc {s['rc']}"
    lines.append(f"| {s['step']} | {state} | {s['seconds']} | {last[:160]} |")
lines += ["", "Logs: `benchmarks/results/gpu_check_logs/`; kernel timings: `gpu_check_kernels_{bf16,fp16}.json`; "
          "compaction cost: `compaction_cost_gpu_check_cuda_bf16.md`."]
(results / "gpu_check_latest.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
echo "gpu_check: $(( $(date +%s) - START )) s; results in benchmarks/results/gpu_check_latest.{json,md}"
exit $FAILED
