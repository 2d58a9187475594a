"""Any `trainer.max_steps >= 1` works with every experiment's schedule, and a step budget alone (max_epochs=-1)
works for the epoch-scheduled and the private experiments.

`experiment=quickstart trainer.max_steps=20` and `experiment=tae_tiny trainer.max_steps=20` divided by zero in
OneCycleLR; `experiment=dp_digits_unbalanced trainer.max_epochs=-1 trainer.max_steps=300` failed with "not
Poisson-sampled"."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import pytest
import torch
from mlflow.tracking import MlflowClient

from experiments.compose import EXPERIMENTS, compose_config
from experiments.runner import run
from lightning_modules.optimizers import build_optimizer
from lightning_modules.schedules import fill_length
from tests.helpers import sqlite_uri

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("steps", [1, 2, 20])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_schedule_takes_any_step_budget(experiment: str, steps: int, outputs: Path) -> None:
    cfg = compose_config([f"experiment={experiment}", f"trainer.max_steps={steps}"], outputs / "job")
    if cfg.model.get("scheduler") is None:
        pytest.skip(f"{experiment} has no schedule")
    net = torch.nn.Linear(3, 3)  # a matrix and a vector: what Muon and AdamW each step (optimizers.MuonAdamW)
    optimizer = build_optimizer(hydra.utils.instantiate(cfg.model.optimizer), list(net.parameters()), net)
    scheduler = fill_length(hydra.utils.instantiate(cfg.model.scheduler), lambda: steps)(optimizer)
    for _ in range(steps):
        lr = optimizer.param_groups[0]["lr"]
        assert math.isfinite(lr) and lr >= 0
        optimizer.step()
        scheduler.step()


def final_run(outputs: Path, experiment: str):
    client = MlflowClient(sqlite_uri(outputs))
    (found,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, found


def test_epoch_schedule_under_a_step_budget(outputs: Path) -> None:
    """digits_classifier's cosine is per epoch (T_max = max_epochs); with max_epochs=-1 its length comes from
    the step budget: 25 steps of 20 batches an epoch = 2 epochs."""
    cfg = compose_config(["experiment=digits_classifier", "trainer.max_epochs=-1", "trainer.max_steps=25",
                          "trainer.enable_progress_bar=false", "test_after_fit=false", "trainer.log_every_n_steps=1"],
                         outputs / "job")
    run(cfg)
    client, found = final_run(outputs, "digits_classifier")
    assert found.info.status == "FINISHED"
    lrs = sorted(client.get_metric_history(found.info.run_id, "lr-AdamW"), key=lambda m: m.step)
    assert [m.value for m in lrs] == pytest.approx([3e-3] * 20 + [1.5e-3] * 5)  # epochs 0 and 1 of a 2-epoch cosine


def test_private_run_bounded_by_steps_alone(outputs: Path) -> None:
    cfg = compose_config(["experiment=dp_digits_unbalanced", "dp=dpsgd", "trainer.max_epochs=-1",
                          "trainer.max_steps=3", "trainer.log_every_n_steps=1", "test_after_fit=false"], outputs / "job")
    run(cfg)
    client, found = final_run(outputs, "dp_digits_unbalanced")
    assert found.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(found.info.run_id, "train/loss")) == [0, 1, 2]
    assert found.data.metrics["privacy/epsilon"] > 0
