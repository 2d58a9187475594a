"""experiments/benchmarks/attention.py: the --smoke CPU mode runs end to end and writes its JSON; without a
GPU the full benchmark says so and exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "benchmarks" / "attention.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it for --smoke
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_smoke_mode_runs_every_variant_and_writes_json(tmp_path):
    done = _run("--smoke", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (result_file,) = tmp_path.glob("attention_cpu*_smoke_*.json")
    result = json.loads(result_file.read_text())
    assert result["device"].startswith("cpu") and result["smoke"]
    rows = {(r["variant"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {(v, i) for v in ("dense", "packed", "guided", "guided-concat") for i in ("ours", "sdpa", "flex")}
    for (variant, impl), row in rows.items():
        assert row["fwd_ms"] is not None, (variant, impl)
        assert row["max_abs_err"] < 1e-4, (variant, impl, row["max_abs_err"])  # every baseline agrees with ours
        if impl != "flex":  # FlexAttention has no CPU backward
            assert row["fwdbwd_ms"] is not None, (variant, impl)
    assert "ours" in done.stdout and "wrote" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_without_cuda_it_explains_and_exits_cleanly(tmp_path):
    done = _run("--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0
    assert "no CUDA device" in done.stdout and "--smoke" in done.stdout
    assert not list(tmp_path.iterdir())
