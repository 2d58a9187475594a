"""The README's main command, in full, makes videos that follow the prompt (issue 12): `experiment=quickstart` as a
user runs it (world, its 1500 training steps on the PCA codec, sampling of the 64 held-out prompts, the probe and
world evaluators), checked on the test metrics it logs to MLflow:

- colour alignment >= 0.95;
- shape and motion alignment >= 0.7 x the same probe's score on the real held-out clips;
- temporal consistency within 1.5x of real clips (outline and coherence IoU, area variation);
- no speckle: background speckle close to the real clips' (the floor with noise is ~0.5).

About 6 minutes on 2 quiet CPU cores (more under load): `python -m pytest -m slow tests/experiments/test_quickstart_quality.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, sqlite_uri


@pytest.mark.slow
def test_quickstart_videos_follow_the_prompt(outputs: Path) -> None:
    run_cli("experiment=quickstart", "trainer.enable_progress_bar=false", timeout=3600)
    (run,) = MlflowClient(sqlite_uri(outputs)).search_runs(
        [MlflowClient(sqlite_uri(outputs)).get_experiment_by_name("quickstart").experiment_id])
    m = {k.removeprefix("test/"): v for k, v in run.data.metrics.items() if k.startswith("test/")}
    report = {k: round(v, 3) for k, v in sorted(m.items())}
    assert m["alignment_colour"] >= 0.95, report
    for attribute in ("shape", "motion"):
        assert m[f"alignment_{attribute}"] >= 0.7 * m[f"alignment_real_{attribute}"], (attribute, report)
    assert m["consistency_iou"] * 1.5 >= m["consistency_iou_real"], report
    assert m["coherence_iou"] * 1.5 >= m["coherence_iou_real"], report
    assert m["area_cv"] <= 1.5 * m["area_cv_real"], report
    assert m["background_speckle"] <= m["background_speckle_real"] + 0.02, report
