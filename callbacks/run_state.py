"""What a resumed run needs beyond weights, optimizer and loops: its MLflow run and its random state.

The runner always adds this callback. It writes into every checkpoint:
- `mlflow`: the tracking URI, experiment and run id, so `ckpt_path=...` continues the same MLflow run;
- `rng`: the Python, NumPy, torch (and CUDA) generator states of the TRAINING stream, so time samples, noise and
  caption dropout after a resume are those an uninterrupted run would have drawn.

The training stream: the global generators' state is snapshot at the end of every training batch and put back
at the start of the next one. Whatever runs between two training steps (validation, media sampling, a data
loader's iterator being created at a resume or an epoch start, a checkpoint) may draw from the global
generators without moving the training draws; so a run resumed from any checkpoint (mid-epoch, at an epoch
end, after validation) draws exactly what the uninterrupted run drew, and the training draws of a run do not
depend on how often it validates.
Only plain types and tensors, so checkpoints load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import MLFlowLogger


def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "cached": cached}


def _numpy_state_from_plain(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])


def capture_rng() -> dict[str, Any]:
    """The global Python, NumPy, torch CPU and (when initialised) CUDA generator states, as plain values."""
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global generators to a `capture_rng()` state (CUDA only when both sides have it)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RunState(Callback):
    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._train_rng: dict[str, Any] | None = None  # the training stream's state after the last batch
        self._log_step: int | None = None  # the loggers' step for the next training batch
        self._restore_log_step = False

    @property
    def state_key(self) -> str:
        return "RunState"

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        run_id = trainer.logger.run_id if isinstance(trainer.logger, MLFlowLogger) else None
        checkpoint["mlflow"] = {
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "run_id": run_id,
        }

    # The training stream (see the module docstring). Lightning runs ModelCheckpoint's on_train_batch_end after
    # every other callback's, so the snapshot a checkpoint stores is the one of the batch it follows.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._train_rng is not None:
            restore_rng(self._train_rng)
        if self._restore_log_step and self._log_step is not None:
            # Lightning adds one to its logging step on every resume, also from a checkpoint taken at an epoch's
            # end, after the step was counted (Lightning's "_batches_that_stepped"): the metrics of a resumed run
            # would then sit one step later than the uninterrupted run's. Put back the count the batch had.
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._log_step
        self._restore_log_step = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._train_rng = capture_rng()
        loop = trainer.fit_loop.epoch_loop
        accumulating = loop._should_accumulate() if hasattr(loop, "_should_accumulate") else False
        self._log_step = loop._batches_that_stepped + (0 if accumulating else 1)

    def state_dict(self) -> dict[str, Any]:
        state = dict(self._train_rng if self._train_rng is not None else capture_rng())
        if self._log_step is not None:
            state["log_step"] = self._log_step
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        state = dict(state_dict)
        self._log_step = state.pop("log_step", None)
        self._restore_log_step = self._log_step is not None
        restore_rng(state)
        self._train_rng = state


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    """The `mlflow` entry of a checkpoint file or sharded checkpoint folder (empty if it has none)."""
    p = Path(path)
    meta_file = p / "meta.pt" if p.is_dir() else p
    if not meta_file.exists():
        return {}
    checkpoint = torch.load(meta_file, map_location="cpu", weights_only=True, mmap=not p.is_dir())
    return checkpoint.get("mlflow") or {}
