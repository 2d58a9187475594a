"""Every experiment config composes, and runs one training step (fast_dev_run) end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.compose import EXPERIMENTS, compose_config
from experiments.runner import run


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(experiment: str, outputs: Path) -> None:
    cfg = compose_config([f"experiment={experiment}"], outputs / "job")
    assert cfg.experiment_name
    assert "_target_" in cfg.model and "_target_" in cfg.data


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_runs_one_step(experiment: str, outputs: Path) -> None:
    cfg = compose_config(
        [f"experiment={experiment}", "trainer.fast_dev_run=true", "trainer.accelerator=cpu", "trainer.devices=1",
         "trainer.enable_progress_bar=false"],
        outputs / "job",
    )
    run(cfg)
