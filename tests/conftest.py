"""Test configuration: run the Triton kernels in the interpreter where no GPU is present.

The switch must be set before anything imports triton, because ``@triton.jit`` picks compiled or
interpreted kernels when the package is imported.

Test modules import their shared helpers (``attention_checks``, this module's ``DEVICE``) by module name:
this folder is put on ``sys.path`` here, so that works under any ``--import-mode``.
"""

import os
import sys
from pathlib import Path

import torch

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="large shape: runs only where CUDA is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def fallbacks_warn_afresh():
    """Each test sees every fallback warning it causes: the package warns once per reason and process."""
    from flash_softmax import reset_stats

    reset_stats(warnings_too=True)
    yield
