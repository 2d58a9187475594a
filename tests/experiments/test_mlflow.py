"""MLflow tracking through real stores: a sqlite file, and a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import free_port, run_cli, sqlite_uri

TINY = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false"]


def runs_of(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment}"
    return client.search_runs([exp.experiment_id])


def test_run_logs_params_tags_metrics_and_artifacts(outputs: Path) -> None:
    run_cli("experiment=digits_classifier", *TINY)
    client = MlflowClient(sqlite_uri(outputs))
    (run,) = runs_of(client, "digits_classifier")
    assert run.info.status == "FINISHED"
    # params: the flattened resolved config
    assert run.data.params["model/optimizer/lr"] == "0.003"
    assert run.data.params["model/net/_target_"] == "lightning_modules.nn.cnn.SmallCNN"
    # tags: commit, overrides, experiment
    assert run.data.tags["experiment"] == "digits_classifier"
    assert "trainer.max_epochs=1" in run.data.tags["overrides"]
    assert run.data.tags["git_commit"]
    # metrics: overall and per class
    assert 0.0 <= run.data.metrics["test/acc"] <= 1.0
    assert all(f"test/acc_class/{k}" in run.data.metrics for k in range(10))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "plots"} <= artifacts
    config_files = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert "config/config_resolved.yaml" in config_files
    # the artifact store is the absolute folder under the outputs, not ./mlruns
    assert (outputs / "mlartifacts").is_dir()


@pytest.mark.slow  # heavy for the default suite (CI's 20 minutes): python -m pytest -m slow
def test_same_seed_same_metrics(outputs: Path) -> None:
    for _ in range(2):
        run_cli("experiment=digits_classifier", "seed=3", *TINY)
    first, second = runs_of(MlflowClient(sqlite_uri(outputs)), "digits_classifier")
    for key in ("test/acc", "test/loss", "val/loss"):
        assert first.data.metrics[key] == second.data.metrics[key], key


def test_sweep_is_a_parent_run_with_child_runs(outputs: Path) -> None:
    run_cli("-m", "experiment=digits_classifier", "seed=0,1", *TINY)
    client = MlflowClient(sqlite_uri(outputs))
    runs = runs_of(client, "digits_classifier")
    parents = [r for r in runs if r.data.tags.get("is_sweep_parent") == "true"]
    assert len(parents) == 1 and len(runs) == 3
    parent_id = parents[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert parents[0].info.status == "FINISHED"
    summary = client.download_artifacts(parent_id, "sweep_summary.md")
    text = Path(summary).read_text()
    assert "seed=0" in text and "seed=1" in text and "test/acc" in text
    # exactly one sweep folder
    assert len(list((outputs / "digits_classifier" / "multiruns").iterdir())) == 1


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    store = tmp_path / "server"
    store.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
         "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("mlflow server exited") from None
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("mlflow server did not start in 90 s")
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_tracking_server_receives_the_run(outputs: Path, mlflow_server: str) -> None:
    run_cli("experiment=digits_classifier", *TINY, env={"MLFLOW_TRACKING_URI": mlflow_server})
    client = MlflowClient(mlflow_server)
    (run,) = runs_of(client, "digits_classifier")
    assert run.info.status == "FINISHED"
    assert "test/acc" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # uploaded through the server
    assert "plots" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (outputs / "mlflow.db").exists()  # the env var won over the embedded store


def test_buffered_logger_writes_every_step_at_flush_and_checkpoint(tmp_path: Path) -> None:
    from callbacks.mlflow_logger import BufferedMLFlowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = BufferedMLFlowLogger(experiment_name="buffered", tracking_uri=uri, synchronous=True, flush_every_s=3600)
    client = MlflowClient(uri)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "lr-AdamW": 0.1}, step=step)
    assert client.get_metric_history(logger.run_id, "train/loss") == []  # still buffered
    logger.after_save_checkpoint(checkpoint_callback=None)
    history = client.get_metric_history(logger.run_id, "train/loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    logger.log_metrics({"train/loss": 0.25}, step=3)  # the checkpoint step's metrics go out at once
    assert len(client.get_metric_history(logger.run_id, "train/loss")) == 4
    logger.log_metrics({"val/acc": 0.9}, step=4)
    assert client.get_metric_history(logger.run_id, "val/acc") == []
    logger.finalize("success")
    assert [m.value for m in client.get_metric_history(logger.run_id, "val/acc")] == [0.9]
    assert client.get_run(logger.run_id).info.status == "FINISHED"
