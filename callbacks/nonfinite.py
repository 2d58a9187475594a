"""Stop (or skip the step) when the training loss is not finite.

`policy="stop"` raises before backward, so the weights and the last checkpoint on disk are the last good ones.
`policy="skip"` drops the step's gradients, so the optimizer leaves the weights as they were, counts it in
`train/nonfinite_skipped` and says so on the console; after `max_consecutive` skipped steps in a row the weights
cannot recover by themselves (e.g. a learning rate that made them blow up) and the run stops as under "stop".
At the end of a run with skipped steps a line tells how many. Non-finite values never reach MLflow (the run's
logger drops them: MLflow would store inf as 1.8e308). Works with any LightningModule in automatic optimisation.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only


class NonFiniteLossError(RuntimeError):
    pass


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)


class NonFiniteLossGuard(Callback):
    """See the module docstring.

    Args:
        policy: "stop" or "skip".
        max_consecutive: under "skip", stop after this many skipped steps in a row (>= 1).
    """

    def __init__(self, policy: str = "stop", max_consecutive: int = 5) -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite.policy={policy!r}; choose stop or skip")
        if int(max_consecutive) < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive={max_consecutive} must be >= 1")
        self.policy = policy
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0
        self._skip_this_step = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if torch.isfinite(loss).all():
            self._skip_this_step = False
            self.consecutive = 0
            return
        where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}, batch {trainer.fit_loop.epoch_loop.batch_idx}"
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite training loss ({loss.item()}) at {where}; weights and checkpoints are the last good "
                "ones. Lower model.optimizer.lr, or set callbacks.nonfinite.policy=skip to skip such steps."
            )
        self._skip_this_step = True
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"callbacks.nonfinite.policy=skip: {self.consecutive} training steps in a row had a non-finite loss "
                f"(last: {loss.item()} at {where}); the weights do not recover, so the run stops ({self.skipped} "
                "steps skipped in all). Lower model.optimizer.lr, or raise callbacks.nonfinite.max_consecutive."
            )
        _say(f"[nonfinite] step {trainer.global_step}: training loss {loss.item()}, step skipped "
             f"({self.consecutive} in a row; the run stops at {self.max_consecutive})")
        pl_module.log("train/nonfinite_skipped", float(self.skipped))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._skip_this_step:
            # Parameters without a gradient are left untouched by torch optimizers.
            optimizer.zero_grad(set_to_none=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.skipped:
            _say(f"[nonfinite] {self.skipped} of {trainer.global_step} training steps were skipped: their loss "
                 "was not finite")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = state_dict.get("skipped", 0)
        self.consecutive = state_dict.get("consecutive", 0)
