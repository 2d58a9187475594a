"""Fidelity to the real clip, for lines whose output has a ground truth (the upsampler, inpainting, editing).

With pixels mapped from [-1, 1] to [0, 1] and per clip:

    PSNR = 10·log10(1 / MSE(x, y))
    SSIM = torchmetrics' structural similarity (Gaussian window 11, σ = 1.5), over the frames of the clip

`baselines` names conditioner previews scored the same way (the upsampler's "bilinear" input), so the
model's figure sits beside the figure it has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torchmetrics.functional.image import structural_similarity_index_measure

from lightning_modules.evaluation.base import Evaluator


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """10·log10(1 / MSE) with pixels mapped from [-1, 1] to [0, 1], per clip → [B]."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean SSIM over the frames of each clip, pixels in [0, 1] → [B]."""
    b = x.shape[0]
    frames = lambda v: rearrange((v.float().clamp(-1, 1) + 1) / 2, "b c t h w -> (b t) c h w")
    values = structural_similarity_index_measure(frames(x), frames(y), data_range=1.0, reduction="none")
    return values.view(b, -1).mean(1)


class Fidelity(Evaluator):
    """psnr, ssim (and psnr_<baseline>, ssim_<baseline>) against the batch's real "video".

    Args:
        baselines: names of conditioner previews to score too (e.g. ["bilinear"]).
        on_validation: also log them on the first validation batch.
    """

    def __init__(self, baselines: Sequence[str] = (), on_validation: bool = True) -> None:
        self.baselines, self.on_validation = list(baselines), on_validation
        self.values: dict[str, list[torch.Tensor]] = {}

    def start(self, module: Any, trainer: Any) -> None:
        self.values = {}

    def _add(self, name: str, value: torch.Tensor) -> None:
        self.values.setdefault(name, []).append(value.detach().cpu())

    def update(self, generated: torch.Tensor, batch: dict[str, Any], extras: dict[str, torch.Tensor]) -> None:
        if "video" not in batch:
            return
        real = batch["video"][: generated.shape[0]].to(generated)
        for suffix, video in [("", generated), *((f"_{n}", extras[n]) for n in self.baselines)]:
            self._add(f"psnr{suffix}", psnr(video.to(real), real))
            self._add(f"ssim{suffix}", ssim(video.to(real), real))

    def compute(self) -> dict[str, float]:
        return {name: float(torch.cat(v).mean()) for name, v in self.values.items()}
