"""The kernels compile for an H100 (sm_90) with the ptxas bundled in triton, no GPU needed (slow: ~1 min).

The interpreter runs Python semantics; this is the check that the same source also goes through the GPU
compiler (see tests/kernels/compile_for_gpu.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "0 failure(s)" in done.stdout
