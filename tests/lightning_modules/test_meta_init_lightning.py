"""The meta-device build through a real Lightning `ModelParallelStrategy` fit on 2 gloo processes (the path of
strategy=fsdp with strategy.parallel.meta_init): configure_model shards and materialises, Lightning's own
materialisation never runs, the model starts initialised (adaLN-Zero output at zero) and trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "tests/lightning_modules/fsdp_meta_init_run.py"


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_fsdp_fit_of_a_model_built_on_meta(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    log = proc.stdout + proc.stderr
    assert "rank 0: materialised" in log and "rank 1: materialised" in log
    assert "Parameter initialization incomplete" not in log  # Lightning's reset_parameters() path did not run
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["param_type"] == "DTensor" and r["output_layer_zero"]
        assert r["pos_std"] == pytest.approx(0.02, rel=0.25)
        assert r["latent_std"] == [2.0] * 4
        assert 0.45 <= r["local_param_bytes"] / r["full_param_bytes"] <= 0.6
    losses = ranks[0]["losses"]
    assert ranks[1]["losses"] == pytest.approx(losses)
    assert losses[-1] < 0.9 * losses[0], losses
