"""Learning-rate schedules that work for any run length and survive a longer budget on resume.

`OneCycle` is torch's OneCycleLR and `Cosine` torch's CosineAnnealingLR (closed form), with three differences:

- any length >= 1 works. OneCycleLR divides by zero when its warm-up ends at step 0 (`pct_start × total_steps
  = 1`, e.g. 20 steps at 5%): a phase of zero length is taken as over, so such a run starts at the peak rate.
  Steps past the end keep the final rate instead of raising "Tried to step ...". Elsewhere the rates (and
  AdamW's cycled beta1) are OneCycleLR's, to the bit.
- the length comes from the config, also on resume: a checkpoint restores the schedule's progress (its step and
  last rates), never its length, so a finished run resumed with a larger `trainer.max_steps` continues on the
  schedule rebuilt for the new length (printed when the length changed).
- a length left unset (None or < 1: e.g. `total_steps: ${trainer.max_steps}` in a run bounded by
  `trainer.max_epochs`) is filled in by `BaseModule.configure_optimizers` from the trainer (`fill_length`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR

# What a checkpoint restores of a schedule: its progress. Everything else (length, shape) is the config's.
PROGRESS_KEYS = ("last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial")


def _load_progress(scheduler: torch.optim.lr_scheduler.LRScheduler, state_dict: dict[str, Any], length_key: str,
                   name: str) -> None:
    stored = state_dict.get(length_key)
    scheduler.__dict__.update({k: v for k, v in state_dict.items() if k in PROGRESS_KEYS})
    current = getattr(scheduler, length_key)
    if stored is not None and stored != current:
        # The optimizer (restored before the schedule) holds the rate the old schedule set for this step: set the
        # new schedule's instead, so the first step after the resume already follows it.
        lrs = scheduler.get_lr()
        for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
        print(f"[schedule] {name}: the checkpoint's schedule had {length_key}={stored}; the config's {current} "
              f"is used: the schedule is rebuilt for the new length from step {scheduler.last_epoch} "
              f"(learning rate {lrs[0]:.3g})")


class OneCycle(OneCycleLR):
    """torch's OneCycleLR for any `total_steps` >= 1 (see the module docstring); same arguments."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_lr: float | list[float], total_steps: int | None = None,
                 **kwargs: Any) -> None:
        if total_steps is None or int(total_steps) < 1:
            raise ValueError(f"model.scheduler.total_steps={total_steps}: the schedule needs a length >= 1 (set "
                             "trainer.max_steps, or leave it to the trainer: see lightning_modules/schedules.py)")
        super().__init__(optimizer, max_lr, total_steps=int(total_steps), **kwargs)

    def get_lr(self) -> list[float]:
        # torch's OneCycleLR.get_lr, with zero-length phases taken as over and the step clamped to the end.
        step = min(self.last_epoch, self.total_steps - 1)
        lrs = []
        for group in self.optimizer.param_groups:
            start = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end = phase["end_step"]
                if step <= end or i == len(self._schedule_phases) - 1:
                    pct = 1.0 if end <= start else min(1.0, max(0.0, (step - start) / (end - start)))
                    lr = self._anneal_func(group[phase["start_lr"]], group[phase["end_lr"]], pct)
                    if self.cycle_momentum:
                        momentum = self._anneal_func(group[phase["start_momentum"]], group[phase["end_momentum"]], pct)
                    break
                start = end
            lrs.append(lr)
            if self.cycle_momentum:
                if self.use_beta1:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
        return lrs

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _load_progress(self, state_dict, "total_steps", "OneCycle")


class Cosine(CosineAnnealingLR):
    """Cosine annealing from the base rate to `eta_min` over `T_max` steps or epochs, then constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, T_max: int | None = None, eta_min: float = 0.0,  # noqa: N803
                 last_epoch: int = -1) -> None:
        if T_max is None or int(T_max) < 1:
            raise ValueError(f"model.scheduler.T_max={T_max}: the schedule needs a length >= 1 (set "
                             "trainer.max_epochs, or leave it to the trainer: see lightning_modules/schedules.py)")
        super().__init__(optimizer, T_max=int(T_max), eta_min=eta_min, last_epoch=last_epoch)

    def get_lr(self) -> list[float]:
        k = min(max(self.last_epoch, 0), self.T_max)
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * k / self.T_max)) / 2
                for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _load_progress(self, state_dict, "T_max", "Cosine")


LENGTH_KEYS = ("total_steps", "T_max")


def fill_length(factory: Any, length: Callable[[], int]) -> Any:
    """`factory` (a scheduler partial) with its unset length (`total_steps` / `T_max` None or < 1) set to
    `length()`; unchanged (and `length` not called) when it has none or it is set."""
    if not isinstance(factory, functools.partial):
        return factory
    for key in LENGTH_KEYS:
        if key in factory.keywords:
            value = factory.keywords[key]
            if value is None or int(value) < 1:
                return functools.partial(factory.func, *factory.args, **{**factory.keywords, key: max(1, int(length()))})
    return factory
