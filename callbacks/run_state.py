"""What a resumed run needs beyond weights, optimizer and loops: its MLflow run and its random state.

The runner always adds this callback. It writes into every checkpoint:
- `mlflow`: the tracking URI, experiment and run id, so `ckpt_path=...` continues the same MLflow run;
- `rng`: the Python, NumPy and torch generator states, restored on load, so dropout and noise after a resume
  are those an uninterrupted run would have drawn.
Only plain types and tensors, so checkpoints load with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import random
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


class RunState(Callback):
    def __init__(self, tracking_uri: str | None = None, experiment_name: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment_name

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

    def state_dict(self) -> dict[str, Any]:
        py_version, py_state, py_gauss = random.getstate()
        return {
            "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        py = state_dict["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss"]))
        np.random.set_state(_numpy_state_from_plain(state_dict["numpy"]))
        torch.set_rng_state(state_dict["torch"])


def read_checkpoint_meta(path: str) -> dict[str, Any]:
    """The `mlflow` entry of a checkpoint file or sharded checkpoint folder (empty if it has none)."""
    from pathlib import Path

    p = Path(path)
    meta_file = p / "meta.pt" if p.is_dir() else p
    if not meta_file.exists():
        return {}
    checkpoint = torch.load(meta_file, map_location="cpu", weights_only=True, mmap=not p.is_dir())
    return checkpoint.get("mlflow") or {}
