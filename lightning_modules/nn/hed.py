"""Holistically-Nested Edge Detection (HED; Xie & Tu, ICCV 2015, arXiv 1504.06375): the edge network AVID's
structure guidance reads (arXiv 2312.03816), loaded from a local folder where a user has its weights. Nothing
is downloaded; without weights, use the Sobel or Canny maps of `nn.controlnet`.

Architecture (`HED`), on frames [N, 3, H, W]:

    x      = BGR(255 · (image + 1) / 2) − mean         image in [-1, 1] RGB; mean = the Caffe model's BGR means
    stage 1 = 2 × (3x3 conv + ReLU),  64 channels       (VGG16's conv1_1, conv1_2)
    stage 2 = 2x2 max-pool, 2 × (3x3 conv + ReLU), 128   (conv2_x)
    stage 3 = 2x2 max-pool, 3 × (3x3 conv + ReLU), 256   (conv3_x)
    stage 4 = 2x2 max-pool, 3 × (3x3 conv + ReLU), 512   (conv4_x)
    stage 5 = 2x2 max-pool, 3 × (3x3 conv + ReLU), 512   (conv5_x)
    side_k  = bilinear upsampling to (H, W) of a 1x1 conv (→ 1 channel) of stage k's output
    edges   = sigmoid(fuse(side_1, …, side_5))            fuse: a 1x1 conv 5 → 1;  edges in [0, 1]

3x3 convs have padding 1 (the size is kept within a stage), max-pools have stride 2 and floor odd sizes, and the
upsampling is `interpolate(..., mode="bilinear", align_corners=False)` to the input's exact size; this is how the
usual PyTorch ports run the model (the Caffe original pads conv1_1 by 35 and crops deconvolved side outputs).

Input convention: the weights expect the Caffe model's input, BGR in 0..255 minus per-channel means. `HED.forward`
takes the project's images (RGB in [-1, 1]) and converts them: scale to 0..255, reorder to BGR, subtract `mean`
(a non-persistent buffer: (104.00698793, 116.66876762, 122.67891434), the BGR means of the original model). It is
not part of the state dict, so `hed.pt` holds exactly the network's weights.

Weights: `load_hed(folder)` reads `folder/hed.pt`, a state dict of this module (`torch.save(HED().state_dict())`
layout) loaded with `weights_only=True` and strict names and shapes. Names, with the Caffe model's layers:

    stages.{s}.{c}.weight / .bias   stage s+1's conv c+1 (conv{s+1}_{c+1});  s = 0..4, c = 0..1 or 0..2
    sides.{s}.weight / .bias        side output s+1 (score-dsn{s+1}), [1, C_s, 1, 1]
    fuse.weight / .bias             the fusion (new-score-weighting), [1, 5, 1, 1]

A converted checkpoint with other names is renamed key by key into this layout once, outside this module.

`hed_edges(video, net)`: video [B, 3, T, H, W] in [-1, 1] → [B, 1, T, H, W] in [0, 1], the net run per frame
(frames folded into the batch) in chunks of frames, without gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange
from torch import nn

VGG16_STAGES = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # (channels, 3x3 convs) per stage
CAFFE_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
WEIGHTS_FILE = "hed.pt"


class HED(nn.Module):
    """The HED network (see the module docstring); randomly initialised, weights come from `load_hed`."""

    def __init__(self) -> None:
        super().__init__()
        stages, channels = [], 3
        for width, convs in VGG16_STAGES:
            layers = []
            for _ in range(convs):
                layers.append(nn.Conv2d(channels, width, 3, padding=1))
                channels = width
            stages.append(nn.ModuleList(layers))
        self.stages = nn.ModuleList(stages)
        self.sides = nn.ModuleList(nn.Conv2d(width, 1, 1) for width, _ in VGG16_STAGES)
        self.fuse = nn.Conv2d(len(VGG16_STAGES), 1, 1)
        self.register_buffer("mean", torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] RGB in [-1, 1] → the weights' input: BGR in 0..255 minus `mean`."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"HED expects images [N, 3, H, W], got {tuple(images.shape)}")
        x = (images.to(self.mean.dtype) + 1) * 127.5
        return x.flip(1) - self.mean

    def side_outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The five side outputs (logits, before the fuse), each upsampled to the input's size: [N, 1, H, W]."""
        x = self.preprocess(images)
        size = x.shape[-2:]
        sides = []
        for i, (stage, side) in enumerate(zip(self.stages, self.sides)):
            if i > 0:
                x = nn.functional.max_pool2d(x, 2, 2)
            for conv in stage:
                x = nn.functional.relu(conv(x))
            sides.append(nn.functional.interpolate(side(x), size=size, mode="bilinear", align_corners=False))
        return sides

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, H, W] RGB in [-1, 1] → edge probabilities [N, 1, H, W] in [0, 1]."""
        return torch.sigmoid(self.fuse(torch.cat(self.side_outputs(images), dim=1)))


def load_hed(folder: str | Path) -> HED:
    """The HED network with the weights of `folder/hed.pt` (a state dict of `HED`), in eval mode, frozen, on CPU."""
    path = Path(folder).expanduser() / WEIGHTS_FILE
    if not path.parent.is_dir():
        raise FileNotFoundError(f"HED: no folder {path.parent}; make it and put the network's weights in it as "
                                f"{WEIGHTS_FILE}, a state dict of lightning_modules.nn.hed.HED")
    if not path.is_file():
        raise FileNotFoundError(f"HED: no file {path}; put the network's weights there, a state dict of "
                                f"lightning_modules.nn.hed.HED")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"HED: {path} holds a {type(state).__name__}, not a state dict of HED")
    net = HED()
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"HED: {path} does not match HED: {len(missing)} missing keys {missing[:4]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:4]}")
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"HED: {path} has {len(wrong)} tensors of the wrong shape: {', '.join(wrong[:3])}")
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    return net


def hed_edges(video: torch.Tensor, net: HED, chunk: int = 16) -> torch.Tensor:
    """HED edges of every frame: video [B, 3, T, H, W] in [-1, 1] → [B, 1, T, H, W] in [0, 1], in the video's
    dtype, computed on the net's device and dtype `chunk` frames at a time, without gradients."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"hed_edges expects a video [B, 3, T, H, W], got {tuple(video.shape)}")
    if chunk < 1:
        raise ValueError(f"hed_edges: chunk={chunk} must be at least 1")
    frames = rearrange(video, "b c t h w -> (b t) c h w")
    weight = net.fuse.weight
    with torch.no_grad():
        edges = torch.cat([net(part.to(device=weight.device, dtype=weight.dtype)) for part in frames.split(chunk)])
    return rearrange(edges, "(b t) 1 h w -> b 1 t h w", b=video.shape[0]).to(device=video.device, dtype=video.dtype)
