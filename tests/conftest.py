import os

import torch

# Triton decides at decoration time whether a kernel is interpreted: set this before anything
# imports triton, so CPU runs execute the real kernel code in Triton's interpreter.
# Model tests on the CPU use flashcore's plain-PyTorch path (the interpreter is too slow for whole
# generations); tests marked `triton` or `gpu` run the kernel. flashcore reads both per call, and
# subprocesses started by tests inherit them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("FLASHCORE_FORCE_REFERENCE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _kernel_for_kernel_tests(request, monkeypatch):
    """Tests marked triton or gpu run flashcore's Triton kernel, not the reference."""
    if "triton" in request.keywords or "gpu" in request.keywords:
        monkeypatch.delenv("FLASHCORE_FORCE_REFERENCE", raising=False)
