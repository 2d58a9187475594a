"""Shared fixtures: every test writes its outputs and MLflow store under its own tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
# Triton kernels run in the interpreter on machines without CUDA; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh output folder (runs, sweeps, sqlite MLflow store) for this test; no tracking server."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("OUTPUT_DIR", str(out))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return out



@pytest.fixture
def one_thread():
    """One intra-op thread for the test: the CPUs are shared, and small ops oversubscribed are ~20x slower under
    load. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
