"""MLflow plumbing shared by the runner and the sweep callback (client API only, never the fluent API).

The run's logger (`BufferedMLFlowLogger`) and `metric_name` live in `callbacks.mlflow_logger`, the lowest floor
that uses them."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

MAX_PARAM_VALUE = 6000  # MLflow's limit; Lightning's log_hyperparams would cut at 250
PARENT_RUN_FILE = "mlflow_parent_run.txt"


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The experiment id of `name`, created if it does not exist yet: with an absolute artifact folder for a
    local store, with the server's own artifact store (proxied uploads) for an http tracking server."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    if is_remote(client.tracking_uri):
        artifact_location = None
    if artifact_location is not None:
        Path(artifact_location).mkdir(parents=True, exist_ok=True)
        artifact_location = Path(artifact_location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"optimizer": {"lr": 1e-3}}} -> {"model/optimizer/lr": 1e-3} (lists kept as one value)."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat: dict[str, Any] = {}
    for key, value in container.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def log_params(client: MlflowClient, run_id: str, cfg: DictConfig) -> None:
    params = [Param(key, str(value)[:MAX_PARAM_VALUE]) for key, value in flatten(cfg).items()]
    for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=params[start : start + 100])


def git_commit(repo_dir: str | Path) -> str:
    """The checked-out commit, with `-dirty` when the working tree has changes; `unknown` outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_dir, capture_output=True, text=True
        ).stdout.strip()
        return f"{sha}-dirty" if dirty else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def unique_run_name(experiment: str) -> str:
    """A readable run name that differs between runs: `<experiment>-<MMDD-HHMMSS>-<4 hex>`. MLflow's own names
    come from Python's `random`, which the run has seeded: every run would get the same one."""
    return f"{experiment}-{time.strftime('%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def is_remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if is_remote(tracking_uri):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"
