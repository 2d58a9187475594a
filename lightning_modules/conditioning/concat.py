"""Conditions concatenated to x_t on the channels: latents on the target's grid, each with its own channels.

    LowResolutionVideo  c = Enc(Bilinear↑r(v)),  v = Bilinear↓r(x) (+ noise) in training   (Movie Gen upsampler)
    StillImage          c = Enc(x[:, :, f]) repeated over the latent frames, f first | middle | random (Animated Stickers)
    Mask                c = the inpainting mask, area-downsampled to the latent grid      (AVID)
    MaskedVideo         c = Enc(x ⊙ (1 − mask))                                            (AVID)
    SourceVideo         c = Enc(source), zeros without one                                 (Movie Gen Edit)

The null value is zero latents. The backbone's input weights for these channels start at zero (`nn.dit.DiT`'s
`cond_channels`), so a text-to-video checkpoint starts unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lightning_modules.conditioning.base import Conditioner, Encode
from lightning_modules.conditioning.masks import MaskGenerator


def resize_video(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of every frame of [B, C, T, H, W] to [B, C, T, height, width] (antialiased when shrinking)."""
    b, c, t, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)
    shrink = height < h or width < w
    frames = nn.functional.interpolate(frames, size=(height, width), mode="bilinear", align_corners=False,
                                       antialias=shrink)
    return frames.reshape(b, t, c, height, width).transpose(1, 2)


class LatentConcat(Conditioner):
    """Base of the concatenated conditions: null = zeros, `channels` latent channels."""

    kind = "concat"

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.channels = int(channels)

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(raw)

    def _check(self, value: torch.Tensor, latent_shape: Sequence[int]) -> torch.Tensor:
        want = (self.channels, *latent_shape[1:])
        if tuple(value.shape[1:]) != want:
            raise ValueError(f"{type(self).__name__}: condition {tuple(value.shape[1:])} does not fit the latent "
                             f"grid {want} (check `channels` and the codec)")
        return value


class LowResolutionVideo(LatentConcat):
    """The spatial upsampler's condition (see the module docstring). A batch may hold "source" [B, 3, T, h, w]
    (`task=sample` on existing videos); otherwise v is made from "video" by bilinear downsampling by `scale`.

    Args:
        scale: r, the upsampling factor; degrade_noise: std of Gaussian noise on v in training.
    """

    def __init__(self, channels: int, scale: int = 2, degrade_noise: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__(channels, dropout)
        self.scale, self.degrade_noise = int(scale), float(degrade_noise)

    def low_resolution(self, video: torch.Tensor, train: bool = False) -> torch.Tensor:
        """v = Bilinear↓r(x) (+ noise in training)."""
        h, w = video.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"LowResolutionVideo: H, W = {h}, {w} must be multiples of scale={self.scale}")
        low = resize_video(video.float(), h // self.scale, w // self.scale)
        if train and self.degrade_noise > 0:
            low = (low + self.degrade_noise * torch.randn_like(low)).clamp(-1, 1)
        return low

    def upsampled(self, batch: dict[str, Any], train: bool = False) -> torch.Tensor:
        """Bilinear↑r(v): the baseline an upsampler has to beat, [B, 3, T, r·h, r·w]."""
        low = batch["source"].float() if "source" in batch else self.low_resolution(batch["video"], train)
        return resize_video(low, low.shape[-2] * self.scale, low.shape[-1] * self.scale)

    def target_size(self, batch: dict[str, Any]) -> tuple[int, int, int] | None:
        """(frames, H, W) of the output for a batch that holds only the low-resolution video."""
        if "source" not in batch:
            return None
        _, _, t, h, w = batch["source"].shape
        return t, h * self.scale, w * self.scale

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        with torch.no_grad():
            return self._check(encode(self.upsampled(batch, train)), latent_shape)

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"bilinear": self.upsampled(batch)}


class StillImage(LatentConcat):
    """One frame of the clip, encoded and repeated over the latent frames (InstructPix2Pix-style concatenation).

    In training the frame is the clip's first, its middle (T // 2: Animated Stickers' middle-frame conditioning,
    so motion can extend both ways from the still), or a random one per sample (`frame`). A batch that holds
    "image" [B, 3, H, W] (a sticker at sampling time) is conditioned on it instead.
    """

    FRAMES = ("first", "middle", "random")

    def __init__(self, channels: int, frame: str = "first", dropout: float = 0.0) -> None:
        super().__init__(channels, dropout)
        if frame not in self.FRAMES:
            raise ValueError(f"StillImage: frame={frame!r}; choose one of {self.FRAMES}")
        self.frame = frame

    def frame_index(self, frames: int, batch_size: int, train: bool) -> torch.Tensor:
        """The conditioning frame of each clip [B]; "random" draws only in training (else the middle)."""
        if self.frame == "first":
            return torch.zeros(batch_size, dtype=torch.long)
        if self.frame == "random" and train:
            return torch.randint(0, frames, (batch_size,))
        return torch.full((batch_size,), frames // 2, dtype=torch.long)

    def image(self, batch: dict[str, Any], train: bool = False) -> torch.Tensor:
        """The conditioning image as a one-frame video [B, 3, 1, H, W]."""
        if "image" in batch:
            return batch["image"].float().unsqueeze(2)
        video = batch["video"]
        index = self.frame_index(video.shape[2], video.shape[0], train).to(video.device)
        return video[torch.arange(video.shape[0], device=video.device), :, index].float().unsqueeze(2)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        with torch.no_grad():
            latent = encode(self.image(batch, train))
        return self._check(latent[:, :, :1].expand(-1, -1, latent_shape[1], -1, -1).contiguous(), latent_shape)

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        frames = int(batch.get("frames") or 1)
        return {"image": self.image(batch).expand(-1, -1, frames, -1, -1)}


class SourceVideo(LatentConcat):
    """The video to edit, c = Enc(source) on the target's latent grid (Movie Gen Edit: the source latent
    concatenated on the channels). A batch without "source" (text-to-video, or images of the T2V task) gets zero
    latents, the null value, so the editor keeps the text-to-video task."""

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        if "source" not in batch:
            size = len(batch["text"]) if "text" in batch else batch["video"].shape[0]
            return torch.zeros(size, self.channels, *latent_shape[1:])
        with torch.no_grad():
            return self._check(encode(batch["source"].float()), latent_shape)

    def target_size(self, batch: dict[str, Any]) -> tuple[int, int, int] | None:
        """(frames, H, W) of the edited video: the source's."""
        return None if "source" not in batch else tuple(int(s) for s in batch["source"].shape[2:])

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"source": batch["source"].float()} if "source" in batch else {}


STATIC_BOXES = MaskGenerator({"box": 1.0}, moving=0.0)


def batch_mask(batch: dict[str, Any], masks: MaskGenerator | None = None) -> torch.Tensor:
    """The batch's "mask" [B, 1, T, H, W] (1 = region to generate); drawn by `masks` (static boxes by default;
    object masks from the batch's "labels") when it has none. The core stores the drawn mask back in the batch,
    so the mask and the masked video of one step agree."""
    if "mask" not in batch:
        b, _, t, h, w = batch["video"].shape
        labels = batch.get("labels")
        drawn = (masks or STATIC_BOXES)(b, t, h, w, None if labels is None else labels.cpu())
        batch["mask"] = drawn.to(batch["video"].device)
    return batch["mask"].float()


class Mask(LatentConcat):
    """The inpainting mask on the latent grid (area-averaged), 1 channel. A batch without a "mask" gets one drawn
    by `masks` (`conditioning.masks.MaskGenerator`; static boxes by default)."""

    def __init__(self, channels: int = 1, dropout: float = 0.0, masks: MaskGenerator | None = None) -> None:
        super().__init__(channels, dropout)
        self.masks = masks

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        mask = nn.functional.adaptive_avg_pool3d(batch_mask(batch, self.masks), tuple(latent_shape[1:]))
        return self._check(mask, latent_shape)


class MaskedVideo(LatentConcat):
    """Enc(x ⊙ (1 − mask)): the video with the region to fill blanked (0, mid-grey in [-1, 1]). Give it the same
    `masks` as the `Mask` conditioner: whichever runs first draws the batch's mask, the other reads it."""

    def __init__(self, channels: int, dropout: float = 0.0, masks: MaskGenerator | None = None) -> None:
        super().__init__(channels, dropout)
        self.masks = masks

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        masked = batch["video"].float() * (1.0 - batch_mask(batch, self.masks))
        with torch.no_grad():
            return self._check(encode(masked), latent_shape)

    def preview(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"masked": batch["video"].float() * (1.0 - batch_mask(batch, self.masks))}
