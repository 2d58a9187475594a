"""The README's main command, in full, makes videos that follow the prompt (issue 12): `experiment=quickstart` as a
user runs it (its world, 3600 training steps of a width-128 DiT on the 24-component PCA codec with its refined
decode, in bfloat16 where the CPU has fast bfloat16, sampling of the 64 held-out prompts, the probe and world
evaluators), checked on the test metrics it logs to MLflow:

- colour alignment >= 0.95;
- shape and motion alignment >= 0.7 x the same probe's score on the real held-out clips;
- temporal consistency within 1.5x of real clips (outline and coherence IoU, area variation);
- no visible speckle: background speckle within 2.5x of the real clips' (noise: ~100x), and at most 0.5% of the
  pixels off the prompt's colours (`off_palette`; real clips ~0.03%, the linear decode's ghosts 1.0-1.4%).

About 5.5 minutes on 2 cores with fast bfloat16 (~8-9 without): `python -m pytest -m slow
tests/experiments/test_quickstart_quality.py -k "not long and not upright"`. Over five training runs and three
sampling seeds the quickstart gave area 1.24-1.49x of real (mean 1.34x), speckle 1.7-1.8x of real and off-palette
0.22-0.29%; in fresh clones at 2f7e2b2 (318 s) and d6a67f8 (334 s): 1.33x / 1.29x, 1.8x and 0.25% / 0.26% on this
test's seed 0 (README, Evaluation).
`experiment=quickstart_long` (7000 steps at guidance 2 of the recipe before the refined decode and training shift
1.5, ~10 minutes) meets the targets but the speckle ones (seed 0: area 1.28x; speckle 3.5x):
`python -m pytest -m slow tests/experiments/test_quickstart_quality.py -k long`.

`experiment=t2v_upright` (a 2.8M-parameter DiT on 8192 clips of solid upright objects whose start, size and speed
vary, 4000 steps: ~20 minutes on a fast 2-core machine, ~45 on a slow one) meets the same targets but the area's
variation (1.8x and 2.1x of real in two runs), which its test reports and does not assert, and the speckle ones
(its recipe predates them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, sqlite_uri


def run_metrics(experiment: str, outputs: Path) -> dict[str, float]:
    """Run `experiment` as a user does and return its test/* metrics from its MLflow store."""
    run_cli(f"experiment={experiment}", "trainer.enable_progress_bar=false", timeout=4 * 3600 - 60)
    client = MlflowClient(sqlite_uri(outputs))
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return {k.removeprefix("test/"): v for k, v in run.data.metrics.items() if k.startswith("test/")}


def assert_videos_follow_the_prompt(m: dict[str, float], area: bool = True, clean: bool = True) -> None:
    """The issue's targets on test metrics `m`; `area=False` leaves the area's variation out, `clean=False` holds
    the speckle to the earlier bound (real + 0.02) and leaves the off-palette pixels out."""
    report = {k: round(v, 3) for k, v in sorted(m.items())}
    assert m["alignment_colour"] >= 0.95, report
    for attribute in ("shape", "motion"):
        assert m[f"alignment_{attribute}"] >= 0.7 * m[f"alignment_real_{attribute}"], (attribute, report)
    assert m["consistency_iou"] * 1.5 >= m["consistency_iou_real"], report
    assert m["coherence_iou"] * 1.5 >= m["coherence_iou_real"], report
    if area:
        assert m["area_cv"] <= 1.5 * m["area_cv_real"], report
    if clean:
        assert m["background_speckle"] <= 2.5 * m["background_speckle_real"], report
        assert m["off_palette"] <= 0.005, report
    else:
        assert m["background_speckle"] <= m["background_speckle_real"] + 0.02, report


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_quickstart_videos_follow_the_prompt(outputs: Path) -> None:
    assert_videos_follow_the_prompt(run_metrics("quickstart", outputs))


@pytest.mark.slow
@pytest.mark.timeout(2 * 3600)  # ~10 minutes on 2 cores with fast bfloat16
def test_quickstart_long_videos_follow_the_prompt(outputs: Path) -> None:
    assert_videos_follow_the_prompt(run_metrics("quickstart_long", outputs), clean=False)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)  # ~20 minutes on a fast 2-core machine, ~45 on a slow one
def test_upright_videos_follow_the_prompt(outputs: Path) -> None:
    m = run_metrics("t2v_upright", outputs)
    print(f"t2v_upright: area CV {m['area_cv'] / m['area_cv_real']:.2f}x of real (target 1.5x; not asserted)")
    assert_videos_follow_the_prompt(m, area=False, clean=False)
