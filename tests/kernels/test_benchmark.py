"""experiments/benchmarks/attention.py: the --smoke CPU mode runs end to end and writes its JSON; without a
GPU the full benchmark says so and exits cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "benchmarks" / "attention.py"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script sets it for --smoke
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU paths, also on a GPU machine
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_smoke_mode_runs_every_variant_and_writes_json(tmp_path):
    done = _run("--smoke", "--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (result_file,) = tmp_path.glob("attention_cpu*_smoke_*.json")
    result = json.loads(result_file.read_text())
    assert result["device"].startswith("cpu") and result["smoke"]
    rows = {(r["variant"], r["impl"]): r for r in result["rows"]}
    impls = ("ours", "sdpa", "sdpa-flash", "sdpa-math", "flex")  # SDPA also with its CPU backends pinned
    assert set(rows) == {(v, i) for v in ("dense", "packed", "guided", "guided-concat") for i in impls}
    for (variant, impl), row in rows.items():
        assert row["fwd_ms"] is not None, (variant, impl)
        assert row["max_abs_err"] < 1e-4, (variant, impl, row["max_abs_err"])  # every baseline agrees with ours
        if impl != "flex":  # FlexAttention has no CPU backward
            assert row["fwdbwd_ms"] is not None, (variant, impl)
    assert "ours" in done.stdout and "wrote" in done.stdout


def test_without_cuda_it_explains_and_exits_cleanly(tmp_path):
    done = _run("--out", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0
    assert "no CUDA device" in done.stdout and "--smoke" in done.stdout
    assert not list(tmp_path.iterdir())


def test_targets_compare_with_the_fastest_pinned_sdpa_row():
    sys.path.insert(0, str(ROOT))
    from experiments.benchmarks.attention import Row, dense_verdict, targets

    def row(impl: str, fwd: float | None, fwdbwd: float | None) -> Row:
        return Row("dense", 128, 4096, 8, 16, impl, 1.0, fwd, 1.0, fwdbwd, 0.0)

    rows = [row("ours", 400.0, 300.0), row("sdpa", 350.0, 250.0), row("sdpa-cudnn", 500.0, 280.0),
            row("sdpa-flash", 330.0, None), row("flex", 900.0, 900.0)]
    fwd, fwdbwd = targets(rows)
    assert (fwd["baseline"], fwd["ratio"], fwd["met"]) == ("sdpa-cudnn", 0.8, False)
    assert fwdbwd["baseline"] == "sdpa-cudnn" and fwdbwd["ratio"] == pytest.approx(300 / 280)
    assert "stays SDPA" in dense_verdict([fwd, fwdbwd])
    rows[2] = row("sdpa-cudnn", 390.0, 280.0)
    assert "could move to Triton" in dense_verdict(targets(rows))
