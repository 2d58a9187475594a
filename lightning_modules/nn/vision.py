"""A small image encoder trained from scratch: the default vision network for reference-image tokens.

    tokens = LN(Conv2d_{k=s=patch}(image) flattened over the patch grid)   [B, (H/p)·(W/p), dim]

A pretrained encoder (e.g. a face or CLIP vision model loaded from a local folder) can stand in for it: any
module image [B, 3, H, W] → [B, N, F] with an attribute `dim` = F.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn


class PatchEncoder(nn.Module):
    """See the module docstring. Args: dim (F), patch (pixels per token side), depth (extra 3x3 conv layers)."""

    def __init__(self, dim: int = 64, patch: int = 4, depth: int = 1) -> None:
        super().__init__()
        self.dim = dim
        layers: list[nn.Module] = [nn.Conv2d(3, dim, kernel_size=patch, stride=patch)]
        for _ in range(depth):
            layers += [nn.SiLU(), nn.Conv2d(dim, dim, kernel_size=3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm(rearrange(self.net(image), "b d h w -> b (h w) d"))
