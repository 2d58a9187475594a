"""The training progress bar of every run (the runner adds it when `trainer.enable_progress_bar` is true).

Lightning's tqdm bar, with the run's step budget beside the epoch: runs bounded by steps (`trainer.max_epochs=-1`)
read "Epoch 14 ... step=1450/1500" instead of Lightning's rich bar's "Epoch 14/-2". A tqdm bar, not the rich
one: tqdm redraws its line with carriage returns only and leaves the job's own prints alone, so the console's
transcript (`run.log`, experiments/console.py) keeps both cleanly; the rich bar re-routes prints through its
live display.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ProgressBar(TQDMProgressBar):
    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        epochs = trainer.max_epochs
        total = f"/{epochs - 1}" if epochs is not None and epochs > 0 else ""
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch}{total}")

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # MLflow's run id, meaningless here
        if trainer.max_steps is not None and trainer.max_steps > 0:
            metrics["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        return metrics
