"""Hydra callback: a multirun is one MLflow parent run; every job of it is a child run.

On multirun start it creates the parent run (tags: sweep folder, the command line) and writes its id to
`<sweep dir>/mlflow_parent_run.txt`, which each job reads (also jobs on other machines, through a shared
filesystem, as with the submitit launcher). On multirun end it writes `sweep_summary.md` to the parent: one
row per child with its params that vary and its final metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from experiments import tracking


def _tracking(config: DictConfig) -> tuple[MlflowClient, str]:
    return MlflowClient(config.logger.tracking_uri), config.logger.tracking_uri


class MLflowSweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)  # the sweep dir's interpolations read it
        client, _ = _tracking(config)
        experiment_id = tracking.get_or_create_experiment(client, config.experiment_name, config.logger.artifact_location)
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        run = client.create_run(
            experiment_id,
            run_name=f"sweep-{sweep_dir.name}",
            tags={"sweep_dir": str(sweep_dir), "command": " ".join(sys.argv), "experiment": config.experiment_name,
                  "is_sweep_parent": "true"},
        )
        (sweep_dir / tracking.PARENT_RUN_FILE).write_text(run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
        marker = Path(config.hydra.sweep.dir) / tracking.PARENT_RUN_FILE
        if not marker.exists():
            return
        parent_id = marker.read_text().strip()
        client, _ = _tracking(config)
        client.log_text(parent_id, summary_table(client, parent_id), "sweep_summary.md")
        client.set_terminated(parent_id, "FINISHED")


def child_runs(client: MlflowClient, parent_id: str) -> list:
    parent = client.get_run(parent_id)
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000
    )


def summary_table(client: MlflowClient, parent_id: str) -> str:
    """Markdown: one row per child run; the overrides that define it, then its final metrics."""
    runs = child_runs(client, parent_id)
    if not runs:
        return "no child runs\n"
    # Headline metrics only: per-class and per-group breakdowns (a/b/c) stay in the child runs.
    metric_keys = sorted(
        {k for r in runs for k in r.data.metrics if k.count("/") == 1 and not k.startswith(("lr-", "epoch"))}
    )
    header = ["run", "overrides", "status", *metric_keys]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(runs, key=lambda r: r.info.start_time):
        values = [f"{r.data.metrics[k]:.4f}" if k in r.data.metrics else "" for k in metric_keys]
        rows.append("| " + " | ".join([r.info.run_id[:8], r.data.tags.get("overrides", ""), r.info.status, *values]) + " |")
    return "\n".join(rows) + "\n"
