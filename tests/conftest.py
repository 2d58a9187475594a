"""Shared fixtures: every test writes its outputs and MLflow store under its own tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PROJECT_ROOT", str(ROOT))


@pytest.fixture
def outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh output folder (runs, sweeps, sqlite MLflow store) for this test; no tracking server."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("OUTPUT_DIR", str(out))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return out

