"""A small convolutional classifier for 8x8 digits (or any small image)."""

from __future__ import annotations

import torch
from torch import nn


def make_norm(kind: str, channels: int) -> nn.Module:
    """GroupNorm by default: unlike BatchNorm it mixes no samples, so per-sample gradients (DP-SGD) exist."""
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm={kind!r}; choose group, batch or none")


class ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm = make_norm(norm, out_channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class SmallCNN(nn.Module):
    """conv-conv-pool, conv-conv-pool, global average, linear. [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, norm: str = "group") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [
                ConvBlock(in_channels, width, norm),
                ConvBlock(width, width, norm),
                ConvBlock(width, 2 * width, norm),
                ConvBlock(2 * width, 2 * width, norm),
            ]
        )
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i % 2 == 1:
                x = self.pool(x)
        return self.head(x.mean(dim=(2, 3)))


class TanhCNN(nn.Module):
    """The fair-DP paper's image model (Esipova et al., after Papernot et al. 2021): Conv3x3(in -> c1) -> tanh ->
    Conv3x3(c1 -> c2) -> tanh -> flatten -> Linear; stride 1, no padding, no pooling, no normalisation.

    On 28x28 MNIST with c1 = 32, c2 = 16 it has 97,114 parameters; on 8x8 digits 7,514 (the linear layer sees
    (size - 4)^2 * c2 features). Every layer has per-example gradients in Opacus.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, channels: tuple[int, int] = (32, 16)) -> None:
        super().__init__()
        if image_size < 5:
            raise ValueError(f"image_size={image_size}: two unpadded 3x3 convolutions need at least 5 pixels")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3)
        self.conv2 = nn.Conv2d(c1, c2, 3)
        self.head = nn.Linear(c2 * (image_size - 4) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        return self.head(x.flatten(1))
