"""The LightningModule base every experiment's module subclasses.

It owns what is the same everywhere: building the optimizer and LR schedule from the config's partials
(after `configure_model`, so the parameters are the sharded ones under FSDP2), applying per-block parallelism,
materialising networks built on the meta device (`strategy.parallel.meta_init`, see `lightning_modules.parallel`),
and the hook for custom tasks (`task=sample`, `task=encode`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_modules.model_parallel import ModelParallel, broadcast_batch, clip_grad_norm, sync_gradients
from lightning_modules.optimizers import build_optimizer
from lightning_modules.parallel import ParallelConfig, has_meta_tensors, materialise, parallelize
from lightning_modules.schedules import fill_length

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
        self.model_parallel: ModelParallel | None = None  # tensor / context parallelism, set in configure_model

    # -- parallelism -------------------------------------------------------------------------------------
    def shard_units(self) -> list[nn.Module]:
        """The repeated blocks to checkpoint and shard one by one. Default: none (the root is one unit)."""
        return []

    def model_parallel_net(self) -> nn.Module | None:
        """The backbone that tensor and context parallelism split (a `nn.dit.DiT`); None: the module has none."""
        return None

    def configure_model(self) -> None:
        """Tensor and context parallelism of the backbone (when configured), activation checkpointing and FSDP2
        per unit, then the networks built on the meta device get their local shards and their `init_weights()`
        values, before Lightning moves the model and builds the optimizer."""
        mesh = None
        if self.parallel is not None or self.device_mesh is not None:
            mesh, self.model_parallel = parallelize(self, self.shard_units(), self.model_parallel_net(),
                                                    self.device_mesh, self.parallel or ParallelConfig(),
                                                    self.model_parallel)
        if has_meta_tensors(self):
            device = self._trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
            done = materialise(self, device, mesh)
            if done is not None:
                rank = mesh.get_local_rank() if mesh is not None else 0
                print(f"[parallel] rank {rank}: materialised {done.tensors} tensors of {', '.join(done.owners)} from the "
                      f"meta device on {device}: {done.local_bytes / 2**20:.1f} MiB here of {done.full_bytes / 2**20:.1f} MiB")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # a batch's "meta" (each sample's json: per-frame tracks, events) holds no tensors, and Lightning would walk
        # it value by value every step (a quickstart step spent ~15% of its time there)
        if not isinstance(batch, dict) or "meta" not in batch:
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        moved = super().transfer_batch_to_device({k: v for k, v in batch.items() if k != "meta"}, device, dataloader_idx)
        return {k: batch[k] if k == "meta" else moved[k] for k in batch}

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # the ranks that split one clip (tensor / context parallel) train on the same batch and noise (after the
        # transfer: datamodules own on_before_batch_transfer)
        return broadcast_batch(batch, self.model_parallel)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        sync_gradients(self.model_parallel)  # once per optimizer step, before gradient clipping

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        if self.model_parallel is None or not gradient_clip_val or gradient_clip_algorithm == "value":
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clip_grad_norm(params, float(gradient_clip_val))  # PyTorch's cannot mix the dp and (dp, tp) meshes

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """As `nn.Module.load_state_dict`; on a model with parts still on the meta device (before
        `configure_model` under `strategy.parallel.meta_init`) the loaded tensors are assigned (a meta tensor has
        no storage to copy into), and materialisation then initialises only what is still on meta."""
        if not assign and has_meta_tensors(self):
            assign = True
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- optimisation --------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def schedule_length(self) -> int:
        """Scheduler steps of this fit (optimizer steps, or epochs for an "epoch" interval), from the trainer; what
        a schedule's unset length (`total_steps` / `T_max` None or < 1) becomes (see `lightning_modules.schedules`)."""
        trainer = self._trainer
        if trainer is None:
            raise ValueError("model.scheduler: its length is unset and there is no trainer to take it from")
        if self.scheduler_interval == "epoch" and trainer.max_epochs is not None and trainer.max_epochs > 0:
            return int(trainer.max_epochs)
        steps = trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            raise ValueError("model.scheduler: its length is unset and the run has no end (trainer.max_steps=-1, "
                             "trainer.max_epochs=-1); set one of them")
        if self.scheduler_interval == "epoch":
            if not math.isfinite(trainer.num_training_batches):  # the loader is not loaded yet: load it now,
                trainer.fit_loop.setup_data()  # as Lightning's estimated_stepping_batches does
            per_epoch = max(1.0, trainer.num_training_batches / max(1, trainer.accumulate_grad_batches))
            return math.ceil(steps / per_epoch)
        return int(steps)

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.optimizer_factory, self.trainable_parameters(), self)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = fill_length(self.scheduler_factory, self.schedule_length)(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval}}

    # -- custom tasks ----------------------------------------------------------------------------------------
    def run_task(self, name: str, trainer: L.Trainer, datamodule: L.LightningDataModule | None, cfg: Any) -> Any:
        """`task=<name>` beyond fit/validate/test. Subclasses that offer tasks override this."""
        raise ValueError(f"task={name!r} is not offered by {type(self).__name__}; it supports fit, validate, test")
