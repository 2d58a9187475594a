"""Exponential moving average (EMA) of a module's weights, used for validation, testing and sampling.

After every optimizer step k (from `start_step`, every `every_n_steps` steps), for every trainable parameter θ:

    θ̄ ← d_k·θ̄ + (1 − d_k)·θ,      d_k = min(decay, (1 + n) / (10 + n)) with `warmup`, else decay,

where n counts the EMA updates so far. During validation and test loops (and `load_ema_weights` for sampling)
the module runs with θ̄ in place of θ; the training weights are swapped back afterwards, so checkpoints always
hold the training weights in "state_dict" and the EMA in this callback's state.

Works under FSDP2: parameters are then DTensors whose local shards the EMA keeps and updates locally (no
communication per step). Checkpoints hold the full EMA tensors (gathered with `full_tensor()` when saving,
which every rank does, and re-sharded like the parameters when loading), so a checkpoint written with 2
ranks loads with 1 or 4, and `load_ema_weights` can read it in a plain process.

Parameter names drop the `_checkpoint_wrapped_module.` part that activation checkpointing inserts, so the EMA
fits a model with or without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_modules.checkpoint_io import EMA_FORMAT, read_ema_state

_WRAP = "_checkpoint_wrapped_module."


def _name(name: str) -> str:
    return name.replace(_WRAP, "")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (collective for a sharded DTensor), on the CPU."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu().clone()


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: sharded with the same mesh and placements for a DTensor."""
    full = full.to(dtype=param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(_local(param).device), param.device_mesh, param.placements)
    return full.to(param.device).clone()


class EMA(Callback):
    """See the module docstring.

    Args:
        decay: d, the EMA decay (0.999 is ~1000 steps of memory).
        warmup: use d_k = min(decay, (1 + n) / (10 + n)) (short runs get a useful average early).
        start_step: first optimizer step that updates the EMA (before it, the EMA tracks the weights).
        every_n_steps: update every that many optimizer steps.
        validate_with_ema / test_with_ema: swap the EMA weights in for the validation / test loops.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, start_step: int = 0, every_n_steps: int = 1,
                 validate_with_ema: bool = True, test_with_ema: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must be in [0, 1)")
        if every_n_steps < 1:
            raise ValueError(f"callbacks.ema.every_n_steps={every_n_steps} must be >= 1")
        self.decay, self.warmup, self.start_step, self.every_n_steps = decay, warmup, start_step, every_n_steps
        self.validate_with_ema, self.test_with_ema = validate_with_ema, test_with_ema
        self.shadow: dict[str, torch.Tensor] = {}
        self.num_updates = 0
        self._loaded: dict[str, Any] | None = None
        self._swapped = False
        self._last_step = -1

    @property
    def state_key(self) -> str:
        return "EMA"

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    @staticmethod
    def tracked(module: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters the EMA averages: the trainable ones, by checkpoint-wrapper-free name."""
        return {_name(n): p for n, p in module.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    def initialise(self, module: nn.Module) -> None:
        """Shadow = the loaded EMA (a resumed run) or a copy of the current weights."""
        params = self.tracked(module)
        if self._loaded is not None:
            stored = self._loaded["shadow"]
            missing = sorted(set(params) - set(stored))
            if missing:
                raise ValueError(f"EMA state in the checkpoint lacks parameters {missing[:5]} of {type(module).__name__}")
            self.shadow = {n: _like(stored[n], p) for n, p in params.items()}
            self.num_updates = int(self._loaded["num_updates"])
            self._loaded = None
        else:
            self.shadow = {n: p.detach().clone() for n, p in params.items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """θ̄ ← d·θ̄ + (1 − d)·θ on the local shards."""
        params = self.tracked(module)
        names = list(self.shadow)
        d = self.current_decay()
        torch._foreach_lerp_([_local(self.shadow[n]) for n in names], [_local(params[n].detach()) for n in names], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def swap(self, module: nn.Module) -> None:
        """Exchange the module's weights and the EMA (twice = no change)."""
        params = self.tracked(module)
        for n, shadow in self.shadow.items():
            p, s = _local(params[n].data), _local(shadow)
            tmp = p.clone()
            p.copy_(s)
            s.copy_(tmp)
        self._swapped = not self._swapped

    # -- hooks -------------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.initialise(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The step count the run starts from (0, or a resumed run's): a batch that ends without an optimizer
        # step (gradient accumulation) still shows it and must not count as an update.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step (gradient accumulation)
            return
        self._last_step = step
        if not self.shadow:
            self.initialise(pl_module)
        if step < self.start_step:
            self.shadow = {n: p.detach().clone() for n, p in self.tracked(pl_module).items()}
        elif step % self.every_n_steps == 0:
            self.update(pl_module)

    def _enter(self, pl_module: L.LightningModule, wanted: bool) -> None:
        if wanted and self.shadow and not self._swapped:
            self.swap(pl_module)

    def _leave(self, pl_module: L.LightningModule) -> None:
        if self._swapped:
            self.swap(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enter(pl_module, self.validate_with_ema)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enter(pl_module, self.test_with_ema)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._leave(pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._leave(pl_module)

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Full EMA tensors (a collective under FSDP2: every rank calls this when a checkpoint is saved)."""
        if self._loaded is not None and not self.shadow:
            return self._loaded
        if self._swapped:
            raise RuntimeError("EMA: a checkpoint was saved while the EMA weights were swapped in")
        return {"format": EMA_FORMAT, "decay": self.decay, "num_updates": self.num_updates,
                "shadow": {n: _full(t) for n, t in self.shadow.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("format") != EMA_FORMAT:
            raise ValueError(f"EMA: unknown checkpoint state format {state_dict.get('format')!r}")
        self._loaded = state_dict
        self.shadow = {}


@torch.no_grad()
def load_ema_weights(module: nn.Module, ckpt_path: str | Path) -> bool:
    """Copy the checkpoint's EMA weights into `module` (for sampling); False when the checkpoint has none."""
    state = read_ema_state(ckpt_path)
    if state is None:
        return False
    params = EMA.tracked(module)
    missing = sorted(set(params) - set(state["shadow"]))
    if missing:
        raise ValueError(f"EMA weights in {ckpt_path} lack parameters {missing[:5]}")
    for name, p in params.items():
        _local(p.data).copy_(_local(_like(state["shadow"][name], p)))
    return True
