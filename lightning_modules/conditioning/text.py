"""The text condition: prompts → a token sequence the backbone cross-attends to (Movie Gen §3.1.4).

    prompt = "FPS-<fps> " + caption   for videos when `fps_in_text` (the paper's frame-rate conditioning)
    null   = ""                        (the unconditional branch of classifier-free guidance)
    P, m   = TextConditioner(prompts)  (`nn.text`: one or more encoders, projected and concatenated)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_modules.conditioning.base import Conditioner, Encode
from lightning_modules.nn.text import TextConditioner


def fps_prompt(caption: str, fps: float, frames: int) -> str:
    """Movie Gen's frame-rate conditioning: "FPS-<fps> <caption>" for videos, the caption alone for images."""
    return f"FPS-{fps:g} {caption}" if frames > 1 and fps > 0 else caption


def batch_fps(batch: dict[str, Any], batch_size: int) -> torch.Tensor:
    """The batch's frame rates [B] (zeros when it has none)."""
    fps = batch.get("fps")
    if fps is None:
        return torch.zeros(batch_size)
    return torch.as_tensor(fps, dtype=torch.float32).flatten().cpu().expand(batch_size).clone()


class Text(Conditioner):
    """See the module docstring.

    Args:
        encoder: the `TextConditioner` (its `dim` must equal the backbone width).
        dropout: probability of training on the empty prompt.
        fps_in_text: prefix video captions with "FPS-<fps> ".
    """

    kind = "context"

    def __init__(self, encoder: TextConditioner, dropout: float = 0.1, fps_in_text: bool = True) -> None:
        super().__init__(dropout)
        self.encoder, self.fps_in_text = encoder, fps_in_text

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def prompts(self, captions: Sequence[str], fps: torch.Tensor, frames: int) -> list[str]:
        if not self.fps_in_text:
            return list(captions)
        return [fps_prompt(c, float(f), frames) if c else "" for c, f in zip(captions, fps.tolist())]

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> list[str]:
        captions = list(batch["text"])
        frames = int(batch["frames"]) if "frames" in batch else int(latent_shape[1])  # the core sets "frames"
        return self.prompts(captions, batch_fps(batch, len(captions)), frames)

    def null(self, raw: list[str]) -> list[str]:
        return [""] * len(raw)

    def forward(self, raw: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(raw)
