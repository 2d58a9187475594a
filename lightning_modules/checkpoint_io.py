"""Reading a module's weights from a Lightning checkpoint: a file, or a sharded folder (strategy=fsdp).

A sharded folder is what torch.distributed.checkpoint (DCP) writes: `.metadata` beside `__<rank>_<n>.distcp`
shards. Lightning's ModelParallelStrategy stores the module's tensors under "state_dict" (DCP keys
"state_dict.<name>"), the optimizers under "optimizer_<i>", and everything else (loops, callbacks such as the
EMA, the MLflow run id) in `meta.pt`. `read_module_state` assembles the full tensors in one process without a
process group, so a checkpoint written by any number of ranks loads anywhere (sampling, evaluation, the next
training stage).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

DCP_METADATA = ".metadata"
SHARDED_STATE_PREFIX = "state_dict."


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A folder written by torch.distributed.checkpoint (it holds `.metadata`)."""
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


def sharded_tensor_metadata(path: str | Path) -> dict[str, object]:
    """The module tensors of a sharded folder: name (without "state_dict.") → DCP TensorStorageMetadata."""
    from torch.distributed.checkpoint import FileSystemReader

    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a sharded (DCP) checkpoint: it has no {DCP_METADATA} file "
                                "(give a checkpoint file, or a folder written with strategy=fsdp)")
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    p = SHARDED_STATE_PREFIX
    tensors = {k[len(p):]: m for k, m in metadata.items() if k.startswith(p) and hasattr(m, "size")}
    if not tensors:
        raise ValueError(f"{path}: a sharded checkpoint without module weights (no '{p}*' tensors)")
    return tensors


EMA_FORMAT = "mediagen-ema/1"  # the state `callbacks.ema.EMA` stores in a checkpoint


def read_ema_state(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The EMA callback state stored in a Lightning checkpoint file or sharded checkpoint folder, or None."""
    path = Path(ckpt_path)
    file = path / "meta.pt" if path.is_dir() else path
    checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    for state in (checkpoint.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("format") == EMA_FORMAT:
            return state
    return None


def read_module_state(path: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """The module's full tensors ("state_dict") of a checkpoint file or sharded folder, on the CPU; with `ema`,
    the EMA's averages in place of the weights it tracks (when the checkpoint has an EMA)."""
    state = _read_state(path)
    shadow = (read_ema_state(path) or {}).get("shadow", {}) if ema else {}
    return {**state, **{name: value for name, value in shadow.items() if name in state}}


def _read_state(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_dir():
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "state_dict" not in checkpoint:
            raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
        return checkpoint["state_dict"]
    import torch.distributed.checkpoint as dcp

    state = {name: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for name, m in sharded_tensor_metadata(path).items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"state_dict": state}, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return state


def newest_checkpoint(path: str | Path) -> Path:
    """A checkpoint file or sharded folder, or the newest `**/checkpoints/last.ckpt` below a folder (e.g. the
    previous stage's outputs)."""
    p = Path(path).expanduser()
    if p.is_file() or is_sharded_checkpoint(p):
        return p
    candidates = [c for c in p.glob("**/checkpoints/last.ckpt") if c.is_file() or is_sharded_checkpoint(c)] \
        if p.is_dir() else []
    if not candidates:
        raise FileNotFoundError(f"no checkpoint at {p} (a .ckpt file, or a folder with **/checkpoints/last.ckpt); "
                                "run the previous stage first")
    return max(candidates, key=checkpoint_mtime)


def checkpoint_mtime(path: Path) -> float:
    """When a checkpoint was last written (a folder's `.metadata` is rewritten with every save)."""
    return (path / DCP_METADATA).stat().st_mtime if path.is_dir() else path.stat().st_mtime
