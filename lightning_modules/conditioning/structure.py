"""Structure maps for a backbone with structure guidance (AVID's stage 2, `nn.controlnet.StructureGuidedUNet`).

`EdgeMap` (kind "structure"): the edges of the batch's video, max-pooled onto the latent grid (a 1-pixel edge
survives the codec's downsampling), 1 channel in [0, 1]. Its null value is an empty map (no edges). Methods:

    "sobel", "canny"  computed in torch (`nn.controlnet.sobel_edges`, `canny_edges`); no weights
    "hed"             AVID's choice: the HED network (`nn.hed`) with the weights of `hed_dir/hed.pt`, a local
                      folder the user provides (nothing is downloaded). The net is loaded once, at the first
                      batch, moved to the video's device, and kept frozen outside the module tree: it is not a
                      submodule, so it never lands in checkpoints (state_dict), optimizers or parameter counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_modules.conditioning.base import Conditioner, Encode
from lightning_modules.nn.controlnet import canny_edges, sobel_edges
from lightning_modules.nn.hed import HED, hed_edges, load_hed

EDGE_METHODS = {"sobel": sobel_edges, "canny": canny_edges}
METHODS = (*EDGE_METHODS, "hed")


class EdgeMap(Conditioner):
    """The edge map of the source video (`batch["video"]`: the clip to inpaint, hole included) on the latent grid.

    Args:
        method: "sobel", "canny" or "hed".
        dropout: probability that a training sample gets no edges.
        hed_dir: for method "hed" (required there, read by it only): a local folder holding `hed.pt`, a state
            dict of `nn.hed.HED` (see `nn.hed.load_hed`).
    """

    kind = "structure"
    channels = 1

    def __init__(self, method: str = "sobel", dropout: float = 0.0, hed_dir: str | None = None) -> None:
        super().__init__(dropout)
        if method not in METHODS:
            raise ValueError(f"EdgeMap: method={method!r}; choose one of {sorted(METHODS)}")
        if method == "hed" and not hed_dir:
            raise ValueError("EdgeMap: method='hed' needs hed_dir, a local folder holding hed.pt (HED's weights)")
        self.method = method
        self.hed_dir = str(hed_dir) if hed_dir else None
        self._hed: list[HED] = []  # a plain list, not a submodule: the frozen net stays out of state_dict

    def hed(self, device: torch.device) -> HED:
        """The HED net, loaded from `hed_dir` at the first call, on `device`."""
        if not self._hed:
            assert self.hed_dir is not None
            self._hed.append(load_hed(self.hed_dir))
        return self._hed[0].to(device)

    def edges(self, batch: dict[str, Any]) -> torch.Tensor:
        """[B, 1, T, H, W] in [0, 1] at the pixels' resolution."""
        video = batch["video"].float()
        if self.method == "hed":
            return hed_edges(video, self.hed(video.device))
        return EDGE_METHODS[self.method](video)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        return nn.functional.adaptive_max_pool3d(self.edges(batch), tuple(latent_shape[1:]))

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(raw)

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"edges": self.edges(batch).expand(-1, 3, -1, -1, -1) * 2 - 1}
