"""The LightningModule base every experiment's module subclasses.

It owns what is the same everywhere: building the optimizer and LR schedule from the config's partials
(after `configure_model`, so the parameters are the sharded ones under FSDP2), applying per-block parallelism,
and the hook for custom tasks (`task=sample`, `task=encode`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_modules.parallel import ParallelConfig, apply_parallelism

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class BaseModule(L.LightningModule):
    """Subclasses implement the steps and, to be sharded block by block, `shard_units()`.

    Args:
        optimizer: a partial that takes the parameters (Hydra `_partial_: true` node).
        scheduler: an optional partial that takes the optimizer; stepped every `scheduler_interval`.
        scheduler_interval: "epoch" or "step".
    """

    def __init__(
        self,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "epoch",
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        # Set from the strategy config by the runner; None means: no activation checkpointing, no FSDP.
        self.parallel: ParallelConfig | None = None

    # -- parallelism -------------------------------------------------------------------------------------
    def shard_units(self) -> list[nn.Module]:
        """The repeated blocks to checkpoint and shard one by one. Default: none (the root is one unit)."""
        return []

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        if self.parallel is None and mesh is None:
            return
        apply_parallelism(self, self.shard_units(), mesh, self.parallel or ParallelConfig())

    # -- optimisation --------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    # -- custom tasks ----------------------------------------------------------------------------------------
    def run_task(self, name: str, trainer: L.Trainer, datamodule: L.LightningDataModule | None, cfg: Any) -> Any:
        """`task=<name>` beyond fit/validate/test. Subclasses that offer tasks override this."""
        raise ValueError(f"task={name!r} is not offered by {type(self).__name__}; it supports fit, validate, test")
