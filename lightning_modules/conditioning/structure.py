"""Structure maps for a backbone with structure guidance (AVID's stage 2, `nn.controlnet.StructureGuidedUNet`).

`EdgeMap` (kind "structure"): the edges of the batch's video (Sobel or Canny, `nn.controlnet`), max-pooled onto
the latent grid (a 1-pixel edge survives the codec's downsampling), 1 channel in [0, 1]. Its null value is an
empty map (no edges). AVID's paper uses HED edges; a network from a local folder can replace these later.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_modules.conditioning.base import Conditioner, Encode
from lightning_modules.nn.controlnet import canny_edges, sobel_edges

EDGE_METHODS = {"sobel": sobel_edges, "canny": canny_edges}


class EdgeMap(Conditioner):
    """The edge map of the source video (`batch["video"]`: the clip to inpaint, hole included) on the latent grid.

    Args:
        method: "sobel" or "canny".
        dropout: probability that a training sample gets no edges.
    """

    kind = "structure"
    channels = 1

    def __init__(self, method: str = "sobel", dropout: float = 0.0) -> None:
        super().__init__(dropout)
        if method not in EDGE_METHODS:
            raise ValueError(f"EdgeMap: method={method!r}; choose one of {sorted(EDGE_METHODS)}")
        self.method = method

    def edges(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, 1, T, H, W] in [0, 1] at the pixels' resolution."""
        return EDGE_METHODS[self.method](batch["video"].float())

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        return nn.functional.adaptive_max_pool3d(self.edges(batch), tuple(latent_shape[1:]))

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(raw)

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"edges": self.edges(batch).expand(-1, 3, -1, -1, -1) * 2 - 1}
