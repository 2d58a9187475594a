"""Image classification: cross-entropy on any backbone, overall and per-class accuracy.

Batches are dicts with "x" [B, C, H, W] and "y" [B] (see datamodules/digits.py).
Logged: `<stage>/loss`, `<stage>/acc`, and at validation and test `<stage>/acc_class/<k>` for every class k.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.base import BaseModule, OptimizerFactory, SchedulerFactory


class Classifier(BaseModule):
    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler)
        self.net = net
        self.num_classes = num_classes
        # Keys are "<stage>_acc" ("train" alone would clash with nn.Module.train).
        self.metrics = nn.ModuleDict(
            {f"{stage}_acc": MulticlassAccuracy(num_classes, average="micro") for stage in ("train", "val", "test")}
            | {f"{stage}_acc_class": MulticlassAccuracy(num_classes, average=None) for stage in ("val", "test")}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        preds = logits.argmax(dim=-1)
        self.metrics[f"{stage}_acc"].update(preds, batch["y"])
        if f"{stage}_acc_class" in self.metrics:
            self.metrics[f"{stage}_acc_class"].update(preds, batch["y"])
        batch_size = len(batch["y"])
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=batch_size, sync_dist=stage != "train")
        if stage != "train":  # train accuracy is logged once per epoch: logging a Metric per step costs ~0.5 ms
            self.log(f"{stage}/acc", self.metrics[f"{stage}_acc"], prog_bar=True, batch_size=batch_size)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_per_class(self, stage: str) -> None:
        metric = self.metrics[f"{stage}_acc_class"]
        for k, value in enumerate(metric.compute()):
            self.log(f"{stage}/acc_class/{k}", value, sync_dist=True)
        metric.reset()

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.metrics["train_acc"].compute(), sync_dist=True)
        self.metrics["train_acc"].reset()

    # The epoch's training accuracy accumulates in a torchmetrics state that the module's state_dict leaves out;
    # kept in checkpoints beside it, so a run resumed mid-epoch reports the accuracy of the whole epoch.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metric = self.metrics["train_acc"]
        checkpoint["train_acc_state"] = {name: value.detach().cpu().clone() for name, value in metric.metric_state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metric = self.metrics["train_acc"]
        for name, value in (checkpoint.get("train_acc_state") or {}).items():
            setattr(metric, name, value.to(getattr(metric, name).device))
            metric._update_count = max(metric._update_count, 1)  # its state holds updates: compute() may run

    def on_validation_epoch_end(self) -> None:
        self._log_per_class("val")

    def on_test_epoch_end(self) -> None:
        self._log_per_class("test")
