"""The interface of an evaluator: a metric (or a side effect, like writing samples) computed on generated
samples during the test loop (after fit, and `task=evaluate`), named in the config under `model.evaluators`.

    evaluator.start(module, trainer)                 once before the loop (train a probe, reset state)
    evaluator.update(generated, batch, extras)       per batch: samples [B, 3, T, H, W] in [-1, 1] for the batch's
                                                     conditions; extras = the conditioners' previews (e.g.
                                                     "bilinear" for the upsampler) at the same size
    evaluator.compute() -> {name: value}             logged as <stage>/<name>, stage = test | eval

An evaluator with `on_validation = True` also runs on the first validation batch (it must be cheap).
Evaluators are plain objects, not nn.Modules: their networks (a probe) stay out of the model's checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Evaluator:
    """Base class; see the module docstring."""

    on_validation: bool = False

    def start(self, module: Any, trainer: Any) -> None:
        """Prepare for a loop (reset accumulated state)."""

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        return {}


def cached_network(cache_dir: str | Path | None, kind: str, key: dict[str, Any], train: Callable[[], nn.Module],
                   empty: Callable[[dict[str, torch.Tensor]], nn.Module]) -> nn.Module:
    """An evaluator's network trained once (`train()`) and kept as `<cache_dir>/<kind>-<sha1 of key>.pt` (its
    state dict); later calls load it into `empty(state)`. Without a cache_dir it is trained every time."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"{kind}-{digest}.pt" if cache_dir else None
    if path is not None and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = empty(state)
        net.load_state_dict(state)
        return net
    net = train()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{id(net)}")
        torch.save(net.state_dict(), tmp)
        tmp.replace(path)
    return net
