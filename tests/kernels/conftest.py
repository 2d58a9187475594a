"""Kernel tests run the Triton kernels on CUDA when there is a GPU, else on CPU through the interpreter.

Triton fixes the interpreter at decoration time (when ``kernels`` is imported), so TRITON_INTERPRET is set
here, before any test module imports ``kernels``. If something imported ``kernels`` earlier in the session
without it (and there is no GPU), every kernel test fails with that explanation instead of a driver error.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kernels  # noqa: E402


@pytest.fixture(autouse=True)
def _triton_can_run() -> None:
    if not (torch.cuda.is_available() or kernels.INTERPRETING):
        pytest.fail("tests/kernels need a GPU or the Triton interpreter, but `kernels` was imported before "
                    "TRITON_INTERPRET=1 was set: set it in tests/conftest.py or the environment")
