"""What a resumed run needs beyond weights, optimizer and loops: its MLflow run and its random state.

The runner always adds this callback. It writes into every checkpoint:
- `mlflow`: the tracking URI, experiment and run id, so `ckpt_path=...` continues the same MLflow run;
- its state (`RunState`): the Python, NumPy, torch (and CUDA) generator states of the TRAINING stream, so time
  samples, noise and caption dropout after a resume are those an uninterrupted run would have drawn; the
  loggers' step; and the sums of epoch-level training metrics of the epoch in progress.

The training stream: torch's generators (CPU, and CUDA when in use: what time samplers, noise and dropout
draw from) are snapshot at the end of every training batch and put back at the start of the next one (a few
microseconds). Whatever runs between two training steps (validation, media sampling, a data loader's
iterator being created at a resume or an epoch start, a checkpoint) may draw from them without moving the
training draws; so a run resumed from any checkpoint (mid-epoch, at an epoch end, after validation) draws
exactly what the uninterrupted run drew, and the training draws of a run do not depend on how often it
validates. Python's and NumPy's generators are saved with each checkpoint and restored when it is loaded.
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
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": _numpy_state_to_plain(np.random.get_state()),
        **_capture_torch(),
    }


def _capture_torch() -> dict[str, Any]:
    """The torch CPU and (when initialised) CUDA generator states: microseconds, so taken at every step."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_torch(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global generators to a `capture_rng()` state (CUDA only when both sides have it)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    _restore_torch(state)


class RunState(Callback):
    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name
        self._train_rng: dict[str, Any] | None = None  # the torch generators after the last training batch
        self._log_step: int | None = None  # the loggers' step for the next training batch
        self._restore_log_step = False
        self._trainer: L.Trainer | None = None
        self._epoch_sums: dict[str, Any] | None = None  # loaded: epoch-level training metrics to add back
        self._merge_epoch_sums = False

    @property
    def state_key(self) -> str:
        return "RunState"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        run_id = trainer.logger.run_id if isinstance(trainer.logger, MLFlowLogger) else None
        checkpoint["mlflow"] = {
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "run_id": run_id,
        }

    # The training stream (see the module docstring). The runner puts this callback first, so the torch
    # generators are back before any other callback's on_train_batch_start; Lightning runs ModelCheckpoint's
    # on_train_batch_end after every other callback's, so a checkpoint stores the state of the batch it follows.
    # Only torch's generators (what training steps draw from) are put back at every step; Python's and NumPy's
    # are saved with each checkpoint and restored when it is loaded.
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._train_rng is not None:
            _restore_torch(self._train_rng)
        if self._restore_log_step and self._log_step is not None:
            # Lightning adds one to its logging step on every resume, also from a checkpoint taken at an epoch's
            # end, after the step was counted (Lightning's "_batches_that_stepped"): the metrics of a resumed run
            # would then sit one step later than the uninterrupted run's. Put back the count the batch had.
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._log_step
        self._restore_log_step = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._train_rng = _capture_torch()
        loop = trainer.fit_loop.epoch_loop
        accumulating = loop._should_accumulate() if hasattr(loop, "_should_accumulate") else False
        self._log_step = loop._batches_that_stepped + (0 if accumulating else 1)
        results = getattr(loop, "_results", {})
        _drop_stand_ins(results, logged_again_only=True)
        if self._merge_epoch_sums:
            self._merge_epoch_sums = False
            if self._epoch_sums is not None and self._epoch_sums["epoch"] == trainer.current_epoch:
                _merge_epoch_metrics(results, self._epoch_sums["metrics"])

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _drop_stand_ins(getattr(trainer.fit_loop.epoch_loop, "_results", {}), logged_again_only=False)

    def state_dict(self) -> dict[str, Any]:
        state = capture_rng()
        if self._train_rng is not None:
            state.update(self._train_rng)
        if self._log_step is not None:
            state["log_step"] = self._log_step
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit":
            results = getattr(trainer.fit_loop.epoch_loop, "_results", {})
            state["epoch_metrics"] = {"epoch": trainer.current_epoch,
                                      "metrics": _epoch_metrics({k: v for k, v in results.items() if STAND_IN not in k})}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        state = dict(state_dict)
        self._log_step = state.pop("log_step", None)
        self._restore_log_step = self._log_step is not None
        self._epoch_sums = state.pop("epoch_metrics", None)
        self._merge_epoch_sums = self._epoch_sums is not None
        restore_rng(state)
        self._train_rng = {k: v for k, v in state.items() if k in ("torch", "cuda")}


# Epoch-level training metrics (self.log(..., on_epoch=True) in training_step, e.g. train/acc) accumulate over the
# epoch in Lightning's result collection, which checkpoints do not hold: a run resumed mid-epoch would average only
# the batches after the resume. Their sums are kept with the training stream's state and added back into the
# first batch after a resume in the same epoch.
#
# Likewise a step-level metric logged only on some steps (train/loss_image on image steps) is repeated by
# Lightning at the following steps of the epoch with its last value; after a resume it would be missing until
# logged again. Its last value is kept too and logged back at the first batch after a resume in the same epoch.
def _epoch_metrics(results: Any) -> dict[str, dict[str, Any]]:
    out = {}
    for key, metric in results.items():
        meta = getattr(metric, "meta", None)
        if meta is None or not getattr(metric, "is_tensor", False) or getattr(metric, "has_reset", False):
            continue
        cache = getattr(metric, "_forward_cache", None)
        if not meta.on_epoch:
            if meta.on_step and isinstance(cache, torch.Tensor):
                out[key] = {"reduce": "last", "value": cache.detach().cpu().clone(), "fx": meta.fx, "name": meta.name,
                            "prog_bar": meta.prog_bar, "logger": meta.logger}
            continue
        mean = meta.is_mean_reduction
        out[key] = {"value": metric.value.detach().cpu().clone(),
                    "count": metric.cumulated_batch_size.detach().cpu().clone() if mean else None,
                    "reduce": "mean" if mean else "max" if meta.is_max_reduction else "min" if meta.is_min_reduction
                    else "sum"}
    return out


def _merge_epoch_metrics(results: Any, saved: dict[str, dict[str, Any]]) -> None:
    for key, stored in saved.items():
        metric = results.get(key)
        if stored["reduce"] == "last":
            if metric is None or getattr(metric, "has_reset", False):  # not logged by this batch: its last value
                # A stand-in under its own key (its options need not match the module's own self.log, which may
                # come later): dropped once the module logs the metric again, or at the epoch's end.
                results.log(f"{stored['fx']}{STAND_IN}", stored["name"], stored["value"], prog_bar=stored["prog_bar"],
                            logger=stored["logger"], on_step=True, on_epoch=False, batch_size=1)
            continue
        if metric is None or not getattr(metric, "is_tensor", False):
            continue
        value = stored["value"].to(metric.value.device, metric.value.dtype)
        if stored["reduce"] == "max":
            metric.value = torch.maximum(metric.value, value)
        elif stored["reduce"] == "min":
            metric.value = torch.minimum(metric.value, value)
        else:
            metric.value = metric.value + value
        if stored["reduce"] == "mean" and stored["count"] is not None:
            metric.cumulated_batch_size = metric.cumulated_batch_size + stored["count"].to(metric.cumulated_batch_size.device)


STAND_IN = "#resumed"


def _drop_stand_ins(results: Any, logged_again_only: bool) -> None:
    for key in [k for k in results if STAND_IN in k]:
        original = results.get(key.replace(STAND_IN, "", 1))
        if not logged_again_only or (original is not None and not getattr(original, "has_reset", False)):
            del results[key]


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    """The `mlflow` entry of a checkpoint file or sharded checkpoint folder (empty if it has none)."""
    p = Path(path)
    meta_file = p / "meta.pt" if p.is_dir() else p
    if not meta_file.exists():
        return {}
    checkpoint = torch.load(meta_file, map_location="cpu", weights_only=True, mmap=not p.is_dir())
    return checkpoint.get("mlflow") or {}
