import os

import torch

# Triton decides at decoration time whether a kernel is interpreted: set this before anything
# imports triton, so CPU runs can execute the real kernel code in Triton's interpreter.
# Models on the CPU default to the torch backend (backend="auto"); tests that want the Triton
# kernels ask for backend="triton" (or flashcore's implementation="triton") explicitly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

