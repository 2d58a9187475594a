"""MLflow plumbing shared by the runner and the sweep callback (client API only, never the fluent API)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

MAX_PARAM_VALUE = 6000  # MLflow's limit; Lightning's log_hyperparams would cut at 250
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit per log_batch request
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


def metric_name(name: str) -> str:
    """MLflow drops characters outside [A-Za-z0-9_/. -]; replace them ourselves (`group=8` -> `group_8`)."""
    return re.sub(r"[^A-Za-z0-9_/. -]", "_", name)


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


def is_remote(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


def ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on this store."""
    if is_remote(tracking_uri):
        return f"open {tracking_uri}"
    return f"mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000"


class BufferedMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, sending metrics to the store in one batch every `flush_every_s` seconds.

    Every store write costs a few milliseconds of Python (SQLAlchemy) that holds the GIL even when MLflow writes
    from its background thread; logged every 10 steps, that was 8% of a small model's step time. Buffered
    metrics keep their own step and timestamp. The buffer is flushed at every checkpoint and again at the next
    `log_metrics` (Lightning logs a step's metrics after that step's checkpoint), so a run killed after a
    checkpoint has every metric up to it and a resumed run's history has no gap; also when the run ends and on
    `flush()`.
    """

    def __init__(self, *args: Any, flush_every_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.flush_every_s = flush_every_s
        self._pending: list[Metric] = []
        self._last_flush = time.monotonic()

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        timestamp_ms = int(time.time() * 1000)
        self._pending.extend(
            Metric(key=metric_name(key), value=float(value), timestamp=timestamp_ms, step=step or 0)
            for key, value in metrics.items()
        )
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Send the buffered metrics to the store (MLflow's async queue when `synchronous=False`)."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        for start in range(0, len(pending), MAX_METRICS_PER_BATCH):
            self.experiment.log_batch(
                run_id=self.run_id, metrics=pending[start : start + MAX_METRICS_PER_BATCH], **self._log_batch_kwargs
            )

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self.flush()
        self._last_flush = float("-inf")  # the checkpoint's own step logs next: send it at once too
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized:
            self.flush()
        super().finalize(status)
