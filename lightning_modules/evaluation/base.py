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

from typing import Any

import torch


class Evaluator:
    """Base class; see the module docstring."""

    on_validation: bool = False

    def start(self, module: Any, trainer: Any) -> None:
        """Prepare for a loop (reset accumulated state)."""

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        return {}
