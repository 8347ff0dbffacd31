import os

import torch

# Triton decides at decoration time whether a kernel is interpreted: set this before anything
# imports triton, so CPU runs execute the real kernel code in Triton's interpreter. flashcore's
# dispatch reads the variable per call.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _reference_attention_unless_kernel_test(request, monkeypatch):
    """CPU model tests use the plain-PyTorch attention; tests marked triton or gpu run the kernel."""
    if "triton" not in request.keywords and "gpu" not in request.keywords:
        monkeypatch.setenv("FLASHCORE_FORCE_REFERENCE", "1")
