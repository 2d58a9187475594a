"""Stop (or skip the step) when the training loss is not finite.

`policy="stop"` raises before backward, so the weights and the last checkpoint on disk are the last good ones;
`policy="skip"` drops the step's gradients, so the optimizer leaves the weights as they were, and counts it in
`train/nonfinite_skipped`. Works with any LightningModule in automatic optimisation.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteLossGuard(Callback):
    def __init__(self, policy: str = "stop") -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite.policy={policy!r}; choose stop or skip")
        self.policy = policy
        self.skipped = 0
        self._skip_this_step = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if torch.isfinite(loss).all():
            self._skip_this_step = False
            return
        where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}, batch {trainer.fit_loop.epoch_loop.batch_idx}"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at {where}; weights and checkpoints are the last good "
                "ones. Set callbacks.nonfinite.policy=skip to skip such steps instead."
            )
        self._skip_this_step = True
        self.skipped += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._skip_this_step:
            # Parameters without a gradient are left untouched by torch optimizers.
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)
