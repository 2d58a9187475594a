"""Named sweeps from conf/sweep/: the basic grid and the Optuna search, each as MLflow parent + children."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import run_cli, sqlite_uri

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false"]


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_optuna_sweep_optimises_val_acc(outputs: Path) -> None:
    run_cli("-m", "experiment=digits_classifier", "sweep=optuna_lr", "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2", *TINY)
    (result,) = (outputs / "digits_classifier" / "multiruns").glob("*/optimization_results.yaml")
    best = yaml.safe_load(result.read_text())
    assert set(best["best_params"]) == {"model.optimizer.lr", "model.net.width"}
    client = MlflowClient(sqlite_uri(outputs))
    runs = client.search_runs([client.get_experiment_by_name("digits_classifier").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2
    assert max(r.data.metrics["val/acc"] for r in children) == best["best_value"]


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_named_grid_sweep_runs_six_children(outputs: Path) -> None:
    run_cli("experiment=digits_classifier", "sweep=seeds_lr", *TINY)  # the sweep file turns on multirun
    client = MlflowClient(sqlite_uri(outputs))
    runs = client.search_runs([client.get_experiment_by_name("digits_classifier").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    grid = sorted((r.data.params["seed"], r.data.params["model/optimizer/lr"]) for r in children)
    assert grid == sorted((s, lr) for s in "012" for lr in ("0.001", "0.003"))
