"""AVID's adjustable structure guidance (arXiv 2312.03816, stage 2): edge maps of a video and a ControlNet-style
trainable copy of the UNet's encoder whose residuals steer the frozen UNet.

Edge maps (pure torch, per frame; video [B, 3, T, H, W] in [-1, 1], as the datamodules give → [B, 1, T, H, W]
in [0, 1]):

    Y       = 0.299 R + 0.587 G + 0.114 B  of (video + 1) / 2        (BT.601 luminance in [0, 1])
    G_x, G_y = Sobel 3x3 of Y (replicated borders);   sobel = min(1, √(G_x² + G_y²) / 4)
                                                      (a full 0 → 1 step gives 1; a constant frame gives 0)
    canny   = Gaussian blur(σ) → Sobel → non-maximum suppression along the gradient (4 directions)
              → double threshold (weak ≥ low, strong ≥ high) → hysteresis (strong grows into connected weak)

The paper uses HED edges: `nn.hed` (weights from a local folder, `EdgeMap(method="hed", hed_dir=...)`) stands
in for these functions with the same shapes ([B, 1, T, H, W] in [0, 1]). The edges are computed on the original
frames, the hole included (retexturing keeps the source's structure inside the mask).

Structure guidance s_θ (ControlNet, Zhang et al. 2023, as AVID uses it):

    h_0   = conv_in'(concat(x_t, cond)) + H(s)            conv_in' a copy of the UNet's; H the hint encoder
    f_i   = the skip features of the copied down levels run from h_0; m = the copied middle block's output
    r_i   = Z_i(f_i),  r_mid = Z_mid(m)                   Z: 1x1 convolutions, zero-initialised
    UNet:   skip_i ← skip_i + w_s·r_i,   mid ← mid + w_s·r_mid        (`UNet.forward(structure=..., structure_weight=w_s)`)

Because every Z and the last layer of H start at zero, the guided UNet starts exactly as the plain one, and w_s = 0
turns guidance off whatever the weights. The copy gets the same inputs as the UNet (AVID's 10 input channels:
latent 4, mask 1, masked latent 4, edges 1): the edges enter through H added to conv_in's output, which is AVID's
extra input channel with zero-initialised weights when H is one conv, and ControlNet's hint embedding in general.

The hint at the latent grid: the edge map is max-pooled onto the latent grid (T', H/s, W/s) of the codec
(PixelCodec s = 4, the TAE s = 8 and 4x in time): a latent cell is an edge when an edge passes anywhere in the
pixels (and frames) it covers; averaging would fade 1-pixel Canny lines by s. Then H, a few 3x3 convolutions at
the latent resolution, maps it to conv_in's width. (ControlNet's strided-conv hint encoder at pixel resolution is
the alternative for a larger gap; at s ≤ 8 the pooled map keeps the structure the latent grid can express.)

Residuals are frame-major [B, T, C, H, W], the UNet's internal layout, so image batches (T = 1), videos (frames
folded into the batch by every spatial layer) and inflated UNets (the copy keeps the UNet's temporal layers in
its encoder) are all handled by the copied layers themselves.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from einops import rearrange
from torch import nn

from lightning_modules.nn.unet import (
    ResBlock,
    SpatialConv,
    SpatialTransformer,
    UNet,
    encoder_pass,
    inflate_layout,
)

LUMA = (0.299, 0.587, 0.114)
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
# what the copy takes from the UNet: its input conv, its time (and fps, pooled-text, guidance) embedders, the
# down levels and the middle block; the names are the UNet's, so the UNet's weights load into the copy by name
ENCODER = ("conv_in", "time", "fps", "text_pool", "guidance_embedders", "down", "mid")


# -- edge maps --------------------------------------------------------------------------------------------------------
def luminance(video: torch.Tensor) -> torch.Tensor:
    """Frames of a video [B, 3 or 1, T, H, W] in [-1, 1] as luminance in [0, 1]: [B·T, 1, H, W]."""
    if video.ndim != 5 or video.shape[1] not in (1, 3):
        raise ValueError(f"edges expect a video [B, 3 or 1, T, H, W], got {tuple(video.shape)}")
    x = (video.float() + 1) / 2
    if x.shape[1] == 3:
        x = torch.einsum("bcthw,c->bthw", x, x.new_tensor(LUMA)).unsqueeze(1)
    return rearrange(x, "b c t h w -> (b t) c h w")


def sobel_gradients(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G_x (along columns, to the right) and G_y (along rows, downwards) of frames [N, 1, H, W], Sobel 3x3 with
    replicated borders (a constant frame has no edge at its border)."""
    kx = frames.new_tensor(SOBEL_X)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)  # [2, 1, 3, 3]: x, then y
    g = nn.functional.conv2d(nn.functional.pad(frames, (1, 1, 1, 1), mode="replicate"), kernels)
    return g[:, :1], g[:, 1:]


def sobel_edges(video: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of every frame: video [B, 3, T, H, W] in [-1, 1] → [B, 1, T, H, W] in [0, 1],
    min(1, √(G_x² + G_y²) / 4): a fixed scale (a full black-to-white step gives 1), not a per-frame maximum, so
    a frame with little structure does not get its noise stretched and videos do not flicker."""
    gx, gy = sobel_gradients(luminance(video))
    magnitude = (torch.hypot(gx, gy) / 4).clamp(max=1.0)
    return rearrange(magnitude, "(b t) 1 h w -> b 1 t h w", b=video.shape[0]).to(video.dtype)


def gaussian_blur(frames: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of frames [N, 1, H, W], radius ⌈2σ⌉, replicated borders; σ = 0: unchanged."""
    if sigma <= 0:
        return frames
    radius = math.ceil(2 * sigma)
    offsets = torch.arange(-radius, radius + 1, dtype=frames.dtype, device=frames.device)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    frames = nn.functional.pad(frames, (radius, radius, radius, radius), mode="replicate")
    frames = nn.functional.conv2d(frames, kernel.view(1, 1, 1, -1))
    return nn.functional.conv2d(frames, kernel.view(1, 1, -1, 1))


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Where magnitude [N, 1, H, W] is a maximum along its gradient direction (quantised to 0°, 45°, 90°, 135°):
    bool [N, 1, H, W]. A pixel must beat its neighbour behind (−direction) strictly and match its neighbour ahead,
    so a tie across a step (two equal pixels) keeps one line, the one before the step (left or top)."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    direction = torch.div(angle + 22.5, 45, rounding_mode="floor").long() % 4
    h, w = magnitude.shape[-2:]
    padded = nn.functional.pad(magnitude, (1, 1, 1, 1))  # zeros: nothing outside the frame
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    # (row, column) step along the gradient: 0° → right, 45° → down-right, 90° → down, 135° → down-left
    for i, (dr, dc) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = padded[..., 1 + dr:1 + dr + h, 1 + dc:1 + dc + w]
        behind = padded[..., 1 - dr:1 - dr + h, 1 - dc:1 - dc + w]
        keep |= (direction == i) & (magnitude > behind) & (magnitude >= ahead)
    return keep


def hysteresis(strong: torch.Tensor, weak: torch.Tensor, iterations: int = 16) -> torch.Tensor:
    """Edges bool [N, 1, H, W]: strong pixels, grown into 8-connected weak pixels one pixel per iteration (a weak
    chain up to `iterations` pixels long from a strong pixel is kept; stops early once nothing grows)."""
    weak = weak | strong
    edges = strong
    for _ in range(iterations):
        grown = weak & (nn.functional.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges


def canny_edges(video: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0,
                iterations: int = 16) -> torch.Tensor:
    """A simple Canny edge map of every frame: video [B, 3, T, H, W] in [-1, 1] → [B, 1, T, H, W] of 0 / 1.

    Gaussian blur (σ) → Sobel → non-maximum suppression → double threshold on the magnitude scaled as in
    `sobel_edges` (weak ≥ low, strong ≥ high) → hysteresis by `iterations` dilations of the strong edges within
    the weak ones."""
    gx, gy = sobel_gradients(gaussian_blur(luminance(video), sigma))
    magnitude = torch.hypot(gx, gy) / 4
    thin = non_maximum_suppression(magnitude, gx, gy)
    edges = hysteresis(thin & (magnitude >= high), thin & (magnitude >= low), iterations)
    return rearrange(edges, "(b t) 1 h w -> b 1 t h w", b=video.shape[0]).to(video.dtype)


# -- structure guidance ----------------------------------------------------------------------------------------------
class StructureGuidance(nn.Module):
    """s_θ: a trainable copy of a UNet's encoder (conv_in, down levels, middle) with a hint encoder and zero
    convolutions; its forward returns the residuals `UNet.forward(structure=...)` adds. See the module docstring.

    Args:
        unet: the UNet to copy (image or inflated); its encoder weights are deep-copied, so the copy starts equal
            to them and every copied parameter trains (even when the UNet is frozen).
        hint_channels: channels of the structure map (1 for edges).
        hint_hidden: width of the hint encoder's hidden 3x3 convolutions.
    """

    def __init__(self, unet: UNet, hint_channels: int = 1, hint_hidden: int = 16) -> None:
        super().__init__()
        self.in_channels, self.cond_channels, self.dim = unet.in_channels, unet.cond_channels, unet.dim
        self.guidance_inputs, self.hint_channels = unet.guidance_inputs, hint_channels
        self.skip_channels = unet.skip_channels
        for name in ENCODER:
            setattr(self, name, copy.deepcopy(getattr(unet, name)))
        self.requires_grad_(True)

        width, middle = unet.channels[0], unet.channels[-1]
        self.hint = nn.Sequential(SpatialConv(hint_channels, hint_hidden), nn.SiLU(),
                                  SpatialConv(hint_hidden, hint_hidden), nn.SiLU(),
                                  SpatialConv(hint_hidden, width))
        self.zero = nn.ModuleList(SpatialConv(c, c, kernel_size=1) for c in self.skip_channels)
        self.zero_mid = SpatialConv(middle, middle, kernel_size=1)
        reference = unet.conv_in.conv.weight
        for part in (self.hint, self.zero, self.zero_mid):
            part.to(device=reference.device, dtype=reference.dtype)
        self.zero_outputs()

    @classmethod
    def from_unet(cls, unet: UNet, hint_channels: int = 1, hint_hidden: int = 16) -> StructureGuidance:
        """The structure guidance of `unet`, its encoder copied (for configs: `_target_: ...from_unet`)."""
        return cls(unet, hint_channels, hint_hidden)

    @torch.no_grad()
    def copy_from(self, unet: UNet) -> None:
        """Copy `unet`'s encoder weights into the copy again, in place (after the UNet loaded a checkpoint, e.g.
        stage 1's, so stage 2 starts from the trained encoder). The hint encoder and zero convs are untouched."""
        for name in ENCODER:
            source = getattr(unet, name)
            if source is not None:
                getattr(self, name).load_state_dict(source.state_dict())

    @torch.no_grad()
    def zero_outputs(self) -> None:
        """Zero every zero conv and the hint encoder's last layer (the guided UNet then equals the plain one); the
        hint encoder's other layers get PyTorch's default initialisation."""
        for m in self.hint.modules():
            if isinstance(m, nn.Conv2d):
                m.reset_parameters()
        for conv in (*self.zero, self.zero_mid, self.hint[-1]):
            nn.init.zeros_(conv.conv.weight)
            nn.init.zeros_(conv.conv.bias)

    @property
    def blocks(self) -> list[nn.Module]:
        """The repeated units (ResBlocks and SpatialTransformers), for activation checkpointing and FSDP2."""
        return [m for m in self.modules() if isinstance(m, ResBlock | SpatialTransformer)]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor,
                context_mask: torch.Tensor | None = None, fps: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, frame_features: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals (r_i, r_mid) for the UNet called with the same x, t and conditions.

        x [B, C, T, H, W], t [B], context [B, L, dim] and the other keywords as `UNet.forward`; hint the
        structure map [B, hint_channels, T_s, H_s, W_s] at any resolution (pixels or latent grid; max-pooled onto
        x's grid). Returns frame-major residuals [B, T, C_i, H_i, W_i], one per skip feature, and [B, T, C, h, w]
        for the middle block."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"StructureGuidance expects a latent [B, {self.in_channels}, T, H, W], got {tuple(x.shape)}")
        if hint.ndim != 5 or hint.shape[:2] != (x.shape[0], self.hint_channels):
            raise ValueError(f"StructureGuidance expects a hint [{x.shape[0]}, {self.hint_channels}, T, H, W], "
                             f"got {tuple(hint.shape)}")
        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels:
                raise ValueError(f"StructureGuidance (cond_channels={self.cond_channels}) needs the UNet's cond, got "
                                 f"{None if cond is None else tuple(cond.shape)}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        h = self.conv_in(rearrange(x, "b c t h w -> b t c h w").contiguous())
        hint = nn.functional.adaptive_max_pool3d(hint.to(h.dtype), x.shape[2:])
        h = h + self.hint(rearrange(hint, "b c t h w -> b t c h w").contiguous())
        # the UNet's embedding code, run on the copied embedders (they carry the UNet's attribute names)
        emb = UNet.embedding(self, t, h.shape[1], context, context_mask, fps, frame_features, guidance).to(h.dtype)
        context = context.to(h.dtype)

        features, h = encoder_pass(self.down, self.mid, h, emb, context, context_mask)
        return [zero(f) for zero, f in zip(self.zero, features)], self.zero_mid(h)


class StructureGuidedUNet(UNet):
    """AVID stage 2's backbone: the stage-1 UNet (inpainting input, motion modules), frozen, with its structure
    guidance s_θ (`StructureGuidance`, trainable):

        prediction = UNet(x_t, t, c; skips += w_s·r_i, middle += w_s·r_mid),   (r, r_mid) = s_θ(x_t, t, c, hint)

    The hint is the structure map of the conditions (`Conditions.structure`, a "structure" conditioner such as
    `conditioning.structure.EdgeMap`); without one, or with w_s = `structure_weight` = 0, it is the plain UNet
    (AVID's task presets: retexturing w_s = 1, object swap 0, uncropping 0). Its parameter names are the UNet's
    plus `guide.*`, so `model.init_from` a stage-1 checkpoint loads the UNet, and `on_stage_loaded` copies the
    loaded encoder into the guidance.

    Args:
        hint_channels, hint_hidden: of `StructureGuidance`.
        structure_weight: w_s.
        temporal: the temporal layout of stage 1 (`unet.video_unet`), or None for an image UNet.
        **kwargs: the UNet's.
    """

    new_in_stage = ("guide.",)  # parameters a previous stage's checkpoint does not have

    def __init__(self, hint_channels: int = 1, hint_hidden: int = 16, structure_weight: float = 1.0,
                 temporal: str | None = "motion_modules", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if temporal is not None:
            inflate_layout(self, temporal)
        self.requires_grad_(False)  # stage 2 trains the guidance only
        self.structure_weight = structure_weight
        self.guide = StructureGuidance.from_unet(self, hint_channels, hint_hidden)

    def init_weights(self) -> None:
        """The UNet's initialisation, then the guidance as a copy of its encoder with zero outputs (the meta-init
        contract of `lightning_modules.parallel`)."""
        super().init_weights()
        if hasattr(self, "guide"):
            self.guide.zero_outputs()
            self.guide.copy_from(self)

    def on_stage_loaded(self) -> None:
        """After `model.init_from` loaded the UNet: the guidance starts from the loaded encoder."""
        self.guide.copy_from(self)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                structure_map: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """As `UNet.forward`, with `structure_map` [B, hint_channels, T, H, W] the guidance's hint."""
        if structure_map is None or self.structure_weight == 0:
            return super().forward(x, t, context, context_mask, **kwargs)
        residuals = self.guide(x, t, context, structure_map, context_mask, **kwargs)
        return super().forward(x, t, context, context_mask, structure=residuals,
                               structure_weight=self.structure_weight, **kwargs)
