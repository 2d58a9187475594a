"""The conditioners of Movie Gen Audio (§6): per-frame video features added to the audio tokens, and masked audio
context concatenated on the channels (extension and infilling).

Video features (`VideoFrameFeatures`, a `FrameFeatures`: projected from zero and added per latent frame):

    f_k      = [pool_g(x_k), pool_g(x_k) − pool_g(x_{k−1})]    frame k of the clip [-1, 1], average-pooled to a
                                                                g×g grid, and its change (0 for k = 0): [B, T_v, 6g²]
    τ_j      = (j + ½) / r                                      centre (s) of audio latent frame j, r = latent rate
    c_j      = f_{k(j)},  k(j) = clamp(⌊τ_j · fps⌋, 0, T_v − 1) the video frame on screen at τ_j

so latent frame j sees the frame shown during it (the paper resamples MetaCLIP features to the 25 Hz latent rate;
ours are parameter-free pooled pixels, the stand-in for a frozen vision encoder). A batch without "video" (text
to audio) gets the null value, zero features.

Masked audio (`AudioContext`, kind "concat", C + 1 channels):

    m_j ∈ {0, 1}     1 where latent frame j is given (known context), 0 where it is generated
    c   = [m ⊙ X_1, m]                     X_1 the normalised audio latent; null: zeros (no context)

In training each clip draws its mask kind with `weights`: none (m = 0: plain generation), prefix (the first
u·T frames known: forward extension), suffix (the last u·T: backward extension), middle (a span of u·T frames
to generate inside known audio, m = 1 elsewhere: infilling), u ~ U(min_frac, max_frac). At sampling a request's
"context_audio" [B, c, S] and "context_mask" [B, T'] (latent frames, 1 = keep) give the context.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from lightning_modules.conditioning.base import Conditioner, Encode
from lightning_modules.conditioning.frames import FrameFeatures
from lightning_modules.conditioning.text import batch_fps

MASK_KINDS = ("none", "prefix", "suffix", "middle")


def video_frame_features(video: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """Video [B, 3, T, H, W] → [B, T, 6·grid²]: each frame pooled to grid×grid and its change from the previous."""
    pooled = nn.functional.adaptive_avg_pool3d(video.float(), (video.shape[2], grid, grid))
    change = torch.cat([torch.zeros_like(pooled[:, :, :1]), pooled[:, :, 1:] - pooled[:, :, :-1]], dim=2)
    return rearrange(torch.cat([pooled, change], dim=1), "b c t h w -> b t (c h w)")


def frames_on_screen(video_frames: int, fps: float, latent_frames: int, latent_rate: float) -> torch.Tensor:
    """k(j) = clamp(⌊(j + ½)/r · fps⌋, 0, T_v − 1) for j < latent_frames: the video frame shown during each
    audio latent frame [latent_frames] (long)."""
    centres = (torch.arange(latent_frames, dtype=torch.float64) + 0.5) / latent_rate
    return torch.floor(centres * fps + 1e-9).long().clamp(0, video_frames - 1)


class VideoFrameFeatures(FrameFeatures):
    """See the module docstring.

    Args:
        dim: the backbone width; latent_rate: audio latent frames per second (the codec's sample_rate / hop);
        grid: pooling grid g (features 6g²); dropout: probability of training without the video (T2A).
    """

    def __init__(self, dim: int, latent_rate: float, grid: int = 8, dropout: float = 0.0) -> None:
        super().__init__(6 * grid * grid, dim, key="video", dropout=dropout)
        self.grid, self.latent_rate = int(grid), float(latent_rate)

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        frames = int(latent_shape[1])
        size = len(batch["text"])
        if batch.get("video") is None:
            return torch.zeros(size, frames, self.projection.in_features)
        video = batch["video"]
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"VideoFrameFeatures: batch['video'] must be [B, 3, T, H, W], got {tuple(video.shape)}")
        fps = batch_fps(batch, size)
        if bool((fps <= 0).any()):
            raise ValueError("VideoFrameFeatures: the batch needs the clips' frame rates (batch['fps'] > 0)")
        features = video_frame_features(video, self.grid)
        index = torch.stack([frames_on_screen(video.shape[2], float(f), frames, self.latent_rate) for f in fps])
        return torch.gather(features, 1, index.to(features.device)[..., None].expand(-1, -1, features.shape[-1]))


def draw_masks(batch_size: int, frames: int, weights: Mapping[str, float], min_frac: float = 0.2,
               max_frac: float = 0.8, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training masks [B, frames] in {0, 1} (1 = known), one kind per clip drawn with `weights` (module docstring)."""
    unknown = set(weights) - set(MASK_KINDS)
    if unknown or not weights or sum(weights.values()) <= 0:
        raise ValueError(f"AudioContext: weights={dict(weights)} must give positive weights to kinds of {MASK_KINDS}")
    kinds = list(weights)
    probabilities = torch.tensor([float(weights[k]) for k in kinds])
    picks = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
    masks = torch.zeros(batch_size, frames)
    for b, pick in enumerate(picks.tolist()):
        u = min_frac + (max_frac - min_frac) * float(torch.rand((), generator=generator))
        span = min(frames - 1, max(1, round(u * frames)))
        kind = kinds[pick]
        if kind == "prefix":
            masks[b, :span] = 1.0
        elif kind == "suffix":
            masks[b, frames - span:] = 1.0
        elif kind == "middle":
            start = int(torch.randint(0, frames - span + 1, (), generator=generator))
            masks[b] = 1.0
            masks[b, start : start + span] = 0.0
    return masks


class AudioContext(Conditioner):
    """See the module docstring.

    Args:
        latent_channels: C of the audio latent (the concatenated channels are C + 1).
        weights: mask kind → relative frequency in training.
        min_frac, max_frac: range of the known (prefix, suffix) or generated (middle) fraction.
        dropout: extra probability of no context (on top of the "none" kind).
    """

    kind = "concat"

    def __init__(self, latent_channels: int, weights: Mapping[str, float] | None = None, min_frac: float = 0.2,
                 max_frac: float = 0.8, dropout: float = 0.0) -> None:
        super().__init__(dropout)
        self.channels = int(latent_channels) + 1
        self.weights = dict(weights or {"none": 0.4, "prefix": 0.2, "suffix": 0.2, "middle": 0.2})
        if not 0.0 < min_frac <= max_frac < 1.0:
            raise ValueError(f"AudioContext: need 0 < min_frac <= max_frac < 1, got {min_frac}, {max_frac}")
        self.min_frac, self.max_frac = min_frac, max_frac
        draw_masks(1, 2, self.weights)  # checks the weights

    def inputs(self, batch: dict[str, Any], encode: Encode, latent_shape: Sequence[int], train: bool) -> torch.Tensor:
        frames = int(latent_shape[1])
        size = len(batch["text"])
        if train:
            masks, audio = draw_masks(size, frames, self.weights, self.min_frac, self.max_frac), batch["audio"]
        elif batch.get("context_audio") is not None:
            masks, audio = torch.as_tensor(batch["context_mask"]).float(), batch["context_audio"]
            if masks.shape != (size, frames):
                raise ValueError(f"AudioContext: context_mask must be [B, latent frames] = [{size}, {frames}], "
                                 f"got {tuple(masks.shape)}")
        else:
            return torch.zeros(size, self.channels, frames, 1, 1)
        if not bool(masks.any()):
            return torch.zeros(size, self.channels, frames, 1, 1)
        latent = encode(audio)
        if latent.shape[2] != frames:
            raise ValueError(f"AudioContext: the context audio has {latent.shape[2]} latent frames, the target {frames}")
        m = rearrange(masks.to(latent), "b t -> b 1 t 1 1")
        return torch.cat([latent * m, m], dim=1)

    def null(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(raw)
