"""Lightning's ModelCheckpoint with two changes for exact resume and disk use.

1. A step-triggered save (`every_n_train_steps`) that falls on the last batch of an epoch whose validation runs
   right after it is taken at the end of that epoch instead, after validation. Lightning resumes a checkpoint
   saved on the last batch of an epoch as "epoch done" and never runs the validation that followed it, so the
   resumed run's history would lack those val/* values; saved after validation, nothing is lost or repeated.
2. `save_last="link"` by default: `last.ckpt` is a symbolic link to the newest checkpoint instead of a second
   copy of it (a real file where links are not possible, e.g. remote paths).
3. The end of training is saved. Lightning saves with validation or on a step count; a run that stops between
   those (`max_steps` mid-epoch, 780 steps with validation every 500) would leave last.ckpt at the earlier save,
   and a stage chained from it (`model.init_from`) would start from weights short of the run's last steps.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.callbacks import ModelCheckpoint


class Checkpoint(ModelCheckpoint):
    """See the module docstring; every argument is ModelCheckpoint's."""

    def __init__(self, *args: Any, save_last: bool | Literal["link"] | None = "link", **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self._save_after_validation = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.save_last == "link" and self.dirpath is not None and not _is_local_file_protocol(self.dirpath):
            self.save_last = True  # links need a local file system
        super().setup(trainer, pl_module, stage)

    @staticmethod
    def _validation_follows(trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether this training batch is its epoch's last and a validation loop runs right after it."""
        if not trainer.enable_validation or batch_idx + 1 != trainer.num_training_batches:
            return False
        every = trainer.check_val_every_n_epoch
        if every is not None and (trainer.current_epoch + 1) % every != 0:
            return False
        val = trainer.num_val_batches
        if isinstance(val, list) and not val:
            return True  # the validation loader is not loaded yet (it is before the first validation): assume one
        return bool(sum(val) if isinstance(val, list) else val)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        steps = self._every_n_train_steps
        if (pl_module.automatic_optimization and steps >= 1 and trainer.global_step % steps == 0
                and self.monitor is None and not self._should_skip_saving_checkpoint(trainer)
                and self._validation_follows(trainer, batch_idx)):
            self._save_after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._save_after_validation:
            self._save_after_validation = False
            if not self._should_skip_saving_checkpoint(trainer):
                candidates = self._monitor_candidates(trainer)
                self._save_topk_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
        super().on_train_epoch_end(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved < trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
