"""Fallback for full-suite runs where triton was imported before tests/kernels/conftest.py could turn on the
interpreter (see conftest): run the interpreter tests in a fresh Python process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_TESTS = Path(__file__).resolve().parent


def test_interpreter_suite_in_a_clean_process(interpreter_usable):
    pytest.importorskip("triton")
    if interpreter_usable:
        pytest.skip("the interpreter tests ran in this process")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "triton_interpreter", str(KERNEL_TESTS)],
        cwd=KERNEL_TESTS.parents[1], env=env, capture_output=True, text=True, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]
