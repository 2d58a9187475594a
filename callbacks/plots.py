"""Plots of the logged metric curves, saved to the MLflow run as `plots/curves.png` at the end of fit.

Reads the history back from MLflow (what was logged is what is plotted) and draws one panel per metric
family (loss, acc, ...) with train and val on the same axes. Works with any module and MLFlowLogger.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import lightning as L
import mlflow
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from callbacks.mlflow_logger import BufferedMLFlowLogger


class MetricCurves(Callback):
    def __init__(self, families: tuple[str, ...] = ("loss", "acc")) -> None:
        self.families = families

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = trainer.logger
        if not isinstance(logger, MLFlowLogger):
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if isinstance(logger, BufferedMLFlowLogger):
            logger.flush()
        mlflow.flush_async_logging()  # plot what was logged, not what reached the store so far
        client, run_id = logger.experiment, logger.run_id
        keys = client.get_run(run_id).data.metrics.keys()
        panels: dict[str, list[str]] = defaultdict(list)
        for key in sorted(keys):
            stage, _, name = key.partition("/")
            if stage in ("train", "val") and name in self.families:
                panels[name].append(key)
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
        for ax, (name, metric_keys) in zip(axes[0], panels.items()):
            for key in metric_keys:
                history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
                ax.plot([m.step for m in history], [m.value for m in history], marker="." if len(history) < 50 else None, label=key)
            ax.set_xlabel("step")
            ax.set_title(name)
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "curves.png"
            fig.savefig(path, dpi=100)
            client.log_artifact(run_id, str(path), artifact_path="plots")
        plt.close(fig)
