"""Frame-aligned features added to the video tokens (Movie Gen Audio conditions on video features this way).

    f = Interp_T(features)         the batch's features [B, T_f, F] resampled (linearly) to T latent frames
    c = W·f                        [B, T, dim], W zero-initialised: a checkpoint without it starts unchanged
    tokens[b, (t, h, w)] += c[b, t]   (in the backbone, averaged over the patch's frames)

Null value: zero features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_modules.conditioning.base import Conditioner, Encode


class FrameFeatures(Conditioner):
    """See the module docstring.

    Args:
        features: F, the width of the batch's features; dim: the backbone width; key: the batch key.
    """

    kind = "frames"

    def __init__(self, features: int, dim: int, key: str = "features", dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.key = key
        self.projection = nn.Linear(features, dim)
        nn.init.zeros_(self.projection.weight)
        nn.init.zeros_(self.projection.bias)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        features = torch.as_tensor(batch[self.key]).float()  # [B, T_f, F]
        if features.ndim != 3 or features.shape[-1] != self.projection.in_features:
            raise ValueError(f"FrameFeatures: batch[{self.key!r}] must be [B, T, {self.projection.in_features}], "
                             f"got {tuple(features.shape)}")
        frames = int(latent_shape[1])
        return nn.functional.interpolate(features.transpose(1, 2), size=frames, mode="linear",
                                         align_corners=True).transpose(1, 2) if features.shape[1] != frames else features

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(raw)

    def forward(self, raw: torch.Tensor) -> torch.Tensor:
        return self.projection(raw.to(self.projection.weight.dtype))
