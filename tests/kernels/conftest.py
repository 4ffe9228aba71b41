"""Kernel tests run on CPU through Triton's interpreter, or compiled on a GPU.

Default (CPU): Triton picks interpreter or compiler when it is imported and when a kernel is decorated
(``triton.language``'s own helpers such as ``tl.sum`` are jitted at triton import), so TRITON_INTERPRET=1 is
set here at import time, before this package's kernel modules are imported, and they are imported (or
re-imported) right away. The previous value is then restored, so the variable does not leak into other test
directories or the subprocesses they start (e.g. vLLM servers); the kernel tests re-set it while they run.

If triton was already imported without the interpreter (another test directory imported vLLM first, which
imports triton), the interpreter cannot work in this process: the tests marked ``triton_interpreter`` are then
skipped here and ``test_interpreter_suite_in_a_clean_process`` runs them in a fresh interpreter instead.

GPU (``ATTNMATCH_KERNEL_TEST_DEVICE=cuda``, what ``scripts/gpu_check.sh`` sets): the interpreter stays off, the
kernels compile for the GPU, and every test marked ``triton_interpreter`` builds its tensors on CUDA (CUDA is
the default device and ``gen`` a CUDA generator while it runs), so the same assertions check the compiled
kernels against the torch references on the device.
"""

import importlib
import importlib.util
import os
import sys

KERNEL_DEVICE = os.environ.get("ATTNMATCH_KERNEL_TEST_DEVICE", "cpu")
ON_GPU = KERNEL_DEVICE == "cuda"

_PREVIOUS_TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreter_usable() -> bool:
    if ON_GPU or importlib.util.find_spec("triton") is None:
        return False
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)  # False if triton was imported uninterpreted


INTERPRETER_USABLE = _interpreter_usable()
if INTERPRETER_USABLE:
    # _triton_common first: the kernels import its jitted `dot` helper.
    for _name in ("_triton_common", "key_scores", "paged_attention_bias", "paged_gather_scatter"):
        _full = f"vllm_attnmatch.kernels.{_name}"
        if _full in sys.modules:
            importlib.reload(sys.modules[_full])
        else:
            importlib.import_module(_full)

if _PREVIOUS_TRITON_INTERPRET is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_TRITON_INTERPRET

import pytest  # noqa: E402
import torch  # noqa: E402


def build_paged(per_seq_tensors, block_size, num_blocks, generator, fill=float("nan")):
    """Place each sequence's dense ``(L, ...)`` tensors into shuffled physical blocks of fresh caches.

    ``per_seq_tensors``: list (per sequence) of tuples of tensors ``(L, *tail)``, one per cache.
    Unused slots hold ``fill`` (NaN by default, so any read of a slot that should be skipped shows up).
    Returns (caches, block_table int32 [num_seqs, max_blocks]).
    """
    n_caches = len(per_seq_tensors[0])
    caches = [
        torch.full((num_blocks, block_size, *t.shape[1:]), fill, dtype=t.dtype) for t in per_seq_tensors[0]
    ]
    lens = [tensors[0].shape[0] for tensors in per_seq_tensors]
    blocks_needed = [-(-L // block_size) for L in lens]
    assert sum(blocks_needed) <= num_blocks
    perm = torch.randperm(num_blocks, generator=generator)
    table = torch.zeros(len(lens), max(max(blocks_needed), 1), dtype=torch.int32)
    used = 0
    for s, tensors in enumerate(per_seq_tensors):
        ids = perm[used: used + blocks_needed[s]]
        used += blocks_needed[s]
        table[s, : len(ids)] = ids.int()
        for pos in range(lens[s]):  # plain per-token loop: this is the naive layout the tests trust
            for c in range(n_caches):
                caches[c][ids[pos // block_size], pos % block_size] = tensors[c][pos]
    return caches, table


def _on_device(request) -> bool:
    """This test runs its kernels compiled on the GPU (see the module docstring)."""
    return ON_GPU and request.node.get_closest_marker("triton_interpreter") is not None


@pytest.fixture
def gen(request):
    return torch.Generator(device="cuda" if _on_device(request) else "cpu").manual_seed(1234)


@pytest.fixture
def paged():
    """The :func:`build_paged` helper (fixtures avoid importing conftest by module name)."""
    return build_paged



@pytest.fixture(autouse=True)
def _triton_interpret_env(monkeypatch, request):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        yield
        return
    if not _on_device(request):
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device("cuda")
    try:
        yield
    finally:
        torch.set_default_device(previous)


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_interpreter: runs Triton kernels on CPU under TRITON_INTERPRET=1")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        import torch as _torch

        if not _torch.cuda.is_available():
            skip = pytest.mark.skip(reason="ATTNMATCH_KERNEL_TEST_DEVICE=cuda but no CUDA device")
            for item in items:
                if item.get_closest_marker("triton_interpreter"):
                    item.add_marker(skip)
        return
    if INTERPRETER_USABLE or importlib.util.find_spec("triton") is None:
        return
    skip = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET was set; "
                                   "run in a clean process by test_interpreter_suite_in_a_clean_process")
    for item in items:
        if item.get_closest_marker("triton_interpreter"):
            item.add_marker(skip)


@pytest.fixture
def interpreter_usable():
    """Whether the interpreter tests can run in this process (see module docstring)."""
    if ON_GPU:
        pytest.skip("the kernel tests run compiled on the GPU in this process")
    return INTERPRETER_USABLE


@pytest.fixture
def on_gpu(request) -> bool:
    """The kernels of this test run compiled on CUDA (``ATTNMATCH_KERNEL_TEST_DEVICE=cuda``)."""
    return _on_device(request)
