"""The Movie Gen temporal autoencoder (TAE): an image VAE inflated to 2.5D (arXiv 2410.13720, §3.1.1).

Tensors are videos `[B, C, T, H, W]`; an image is a video with T = 1. Every layer is one of:

- `Conv2p5d`: a 2D spatial conv (a Conv3d with kernel (1, k, k)) followed by a 1D temporal conv (kernel
  (k, 1, 1)) with symmetric replicate padding. The temporal conv starts as the identity (centre tap = I).
- `AttnBlock`: spatial self-attention over the H·W positions of each frame, then temporal self-attention over
  the T frames of each position (`SelfAttention`, through the project's attention entry point). The temporal output projection starts at zero (the block starts as the image
  model's attention).
- `FrameGroupNorm`: GroupNorm with statistics per frame (never across time), so that a frame's features do not
  depend on the clip's length: images and videos share statistics and temporal tiles see the same numbers.

Compression: `fs = 2^(len(channel_mults) - 1)` in H and W (stride-2 spatial convs), `ft = 2^sum(temporal_down)`
in T (stride-2 temporal convs); the decoder mirrors it with nearest-neighbour upsampling followed by a conv.
The paper's sizes: `channel_mults=(1, 2, 4, 4)`, `temporal_down=(True, True, True)`, `latent_channels=16`, i.e.
a video `[3, T, H, W]` becomes a latent `[16, T/8, H/8, W/8]`.

Length rule (any T >= 1 encodes):
- `encode`: T' = ceil(T / ft) latent frames. A clip whose length is not a multiple of ft is first extended by
  repeating its last frame up to ft·T' frames. One frame (an image) is encoded as it is: it gives exactly the
  latent of the static clip of ft copies of it (every layer maps a constant-in-time input to a
  constant-in-time output), at 1/ft of the cost.
- `decode(z, num_frames)`: T' > 1 latent frames decode to ft·T' frames; one latent frame decodes to one frame
  (the static clip). `num_frames` keeps the first `num_frames` of them (the surplus frames are dropped, as in the
  paper); for T' = 1 it repeats the frame. `forward(x)` returns exactly T frames.
- Consequence: every layer is time-symmetric (replicate padding, nearest upsampling), so one latent frame can
  only decode to a static clip; clips that should keep their motion need more than ft frames.

Tiling (constant peak memory in the length, the paper's inference recipe):
- `encode_tiled`: non-overlapping temporal tiles of `tile·ft` frames (`tile` latent frames each).
- `decode_tiled`: temporal tiles of `tile` latent frames with `overlap` latent frames shared by neighbours,
  blended with linear ramps; optionally spatial tiles blended the same way. Tiles are an approximation: a tile
  sees replicate padding instead of its neighbours' frames, and attention and GroupNorm statistics only inside
  the tile. It is exact for a per-frame decoder (temporal layers at init) and for static latents; spatial tiles
  (per-tile GroupNorm statistics) are the rougher approximation.
- `inflate_image_weights`: initialise a video TAE from a trained image autoencoder (a TAE built with
  `temporal=False`, or any 2D model with the same parameter names): spatial weights are copied (2D kernels
  `[O, I, k, k]` become `[O, I, 1, k, k]`), temporal layers keep their identity initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from lightning_modules.nn.attention import attend


def pad_time(x: torch.Tensor, left: int, right: int) -> torch.Tensor:
    """Replicate the first frame `left` times and the last frame `right` times: `[B, C, T, H, W]`."""
    if left == 0 and right == 0:
        return x
    return F.pad(x, (0, 0, 0, 0, left, right), mode="replicate")


# -- layers ----------------------------------------------------------------------------------------------------
class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm of each frame on its own: statistics over (C/G, H, W), never over T."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(rearrange(x, "b c t h w -> (b t) c h w"))
        return rearrange(y, "(b t) c h w -> b c t h w", b=x.shape[0])


def norm(channels: int, groups: int) -> FrameGroupNorm:
    return FrameGroupNorm(math.gcd(groups, channels), channels, eps=1e-6)


class TemporalConv(nn.Module):
    """1D conv along T with symmetric replicate padding: y[t] = b + Σ_j W_j · x[s·t + j - k//2].

    Initialised to the identity (W_{k//2} = I, the other taps and b = 0). With stride s = 2 and even T the
    output has T/2 frames.
    """

    def __init__(self, channels: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError(f"temporal kernel must be odd, got {kernel}")
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv3d(channels, channels, (kernel, 1, 1), stride=(stride, 1, 1))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[:, :, kernel // 2, 0, 0] = torch.eye(channels)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(pad_time(x, self.kernel // 2, self.kernel // 2))


class Conv2p5d(nn.Module):
    """A 2D conv on every frame (kernel (1, k, k), spatial stride s), then a `TemporalConv` (stride st).

    `temporal=False` leaves out the temporal conv: the layer of the image autoencoder.
    """

    def __init__(
        self, cin: int, cout: int, kernel: int = 3, stride: int = 1, temporal_stride: int = 1, temporal: bool = True
    ) -> None:
        super().__init__()
        if temporal_stride != 1 and not temporal:
            raise ValueError("a temporal stride needs temporal layers (temporal=True)")
        self.spatial = nn.Conv3d(cin, cout, (1, kernel, kernel), stride=(1, stride, stride), padding=(0, kernel // 2, kernel // 2))
        self.temporal = TemporalConv(cout, stride=temporal_stride) if temporal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spatial(x)
        return self.temporal(x) if self.temporal is not None else x


class ResBlock(nn.Module):
    """x + Conv2p5d(SiLU(Norm(Conv2p5d(SiLU(Norm(x)))))), with a pointwise conv on the skip when C changes."""

    def __init__(self, cin: int, cout: int, groups: int, temporal: bool) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(cin, groups), Conv2p5d(cin, cout, temporal=temporal)
        self.norm2, self.conv2 = norm(cout, groups), Conv2p5d(cout, cout, temporal=temporal)
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """x + Out(softmax(Q Kᵀ / √d) V) over the tokens of one axis: "space" (H·W per frame) or "time" (T per position).

    Runs the project's attention entry point (`lightning_modules.nn.attention.attend`: Triton on CUDA, SDPA
    elsewhere or when the head dim is too large for the kernels).
    """

    def __init__(self, channels: int, heads: int, groups: int, axis: str, zero_init: bool = False) -> None:
        super().__init__()
        if axis not in ("space", "time"):
            raise ValueError(f"attention axis must be 'space' or 'time', got {axis!r}")
        if channels % heads:
            raise ValueError(f"attention: {channels} channels do not split into {heads} heads")
        self.axis, self.heads = axis, heads
        self.norm = norm(channels, groups)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.out = nn.Conv3d(channels, channels, 1)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = x.shape
        qkv = self.qkv(self.norm(x))
        if self.axis == "space":
            q, k, v = rearrange(qkv, "b (k n d) t h w -> k (b t) n (h w) d", k=3, n=self.heads)
        else:
            q, k, v = rearrange(qkv, "b (k n d) t h w -> k (b h w) n t d", k=3, n=self.heads)
        y = attend(q, k, v)
        if self.axis == "space":
            y = rearrange(y, "(b t) n (h w) d -> b (n d) t h w", b=b, h=h)
        else:
            y = rearrange(y, "(b h w) n t d -> b (n d) t h w", b=b, h=h, w=w)
        return x + self.out(y)


class AttnBlock(nn.Module):
    """Spatial attention, then (video model) temporal attention with a zero-initialised output."""

    def __init__(self, channels: int, heads: int, groups: int, temporal: bool) -> None:
        super().__init__()
        self.spatial = SelfAttention(channels, heads, groups, "space")
        self.temporal = SelfAttention(channels, heads, groups, "time", zero_init=True) if temporal else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.spatial(x)
        return self.temporal(x) if self.temporal is not None else x


class Upsample(nn.Module):
    """Nearest-neighbour ×2 in H, W (and in T when `temporal_up` and T > 1), then a Conv2p5d."""

    def __init__(self, channels: int, temporal_up: bool, temporal: bool) -> None:
        super().__init__()
        self.temporal_up = temporal_up
        self.conv = Conv2p5d(channels, channels, temporal=temporal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One frame stays one frame: a static clip is constant in time, so ×2 in T would only copy it.
        st = 2 if self.temporal_up and x.shape[2] > 1 else 1
        return self.conv(F.interpolate(x, scale_factor=(st, 2, 2), mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int, temporal: bool) -> None:
        super().__init__()
        self.res1 = ResBlock(channels, channels, groups, temporal)
        self.attn = AttnBlock(channels, heads, groups, temporal)
        self.res2 = ResBlock(channels, channels, groups, temporal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res2(self.attn(self.res1(x)))


# -- encoder and decoder -------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """conv_in → per level: `num_res_blocks` ResBlocks, then a stride-2 Conv2p5d (not after the last level)
    → mid block (res, attention, res) → norm, SiLU, conv_out to `out_channels`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mults: Sequence[int],
        temporal_down: Sequence[bool],
        num_res_blocks: int,
        heads: int,
        groups: int,
        temporal: bool,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        self.conv_in = Conv2p5d(in_channels, widths[0], temporal=temporal)
        self.levels = nn.ModuleList()
        cin = widths[0]
        for i, cout in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, groups, temporal) for j in range(num_res_blocks))
            if i < len(widths) - 1:
                level.down = Conv2p5d(cout, cout, stride=2, temporal_stride=2 if temporal_down[i] else 1, temporal=temporal)
            self.levels.append(level)
            cin = cout
        self.mid = MidBlock(cin, heads, groups, temporal)
        self.norm_out = norm(cin, groups)
        self.conv_out = Conv2p5d(cin, out_channels, temporal=temporal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if hasattr(level, "down"):
                h = level.down(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """conv_in → mid block → per level (deepest first): `num_res_blocks + 1` ResBlocks, then nearest ×2 + conv
    (not after the shallowest level) → norm, SiLU, conv_out to `out_channels`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        base_channels: int,
        channel_mults: Sequence[int],
        temporal_down: Sequence[bool],
        num_res_blocks: int,
        heads: int,
        groups: int,
        temporal: bool,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults][::-1]
        temporal_up = list(temporal_down)[::-1]
        self.conv_in = Conv2p5d(in_channels, widths[0], temporal=temporal)
        self.mid = MidBlock(widths[0], heads, groups, temporal)
        self.levels = nn.ModuleList()
        cin = widths[0]
        for i, cout in enumerate(widths):
            level = nn.Module()
            level.blocks = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, groups, temporal) for j in range(num_res_blocks + 1))
            if i < len(widths) - 1:
                level.up = Upsample(cout, temporal_up[i], temporal)
            self.levels.append(level)
            cin = cout
        self.norm_out = norm(cin, groups)
        self.conv_out = Conv2p5d(cin, out_channels, temporal=temporal)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.levels:
            for block in level.blocks:
                h = block(h)
            if hasattr(level, "up"):
                h = level.up(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# -- the latent distribution -----------------------------------------------------------------------------------------
@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); `logvar=None` for a deterministic autoencoder (z = mean)."""

    mean: torch.Tensor
    logvar: torch.Tensor | None = None

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + exp(logvar / 2) · ε, ε ~ N(0, I)."""
        if self.logvar is None:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per latent element, averaged: mean(½ (μ² + σ² − 1 − log σ²)); 0 when deterministic."""
        if self.logvar is None:
            return self.mean.new_zeros(())
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).mean()


# -- the autoencoder ---------------------------------------------------------------------------------------------------
class TAE(nn.Module):
    """The temporal autoencoder. See the module docstring for the length rule and tiling.

    Args:
        in_channels: pixel channels (3).
        latent_channels: C of the latent (16 in the paper).
        base_channels: width of the first level; level i has `base_channels * channel_mults[i]` channels.
        channel_mults: one entry per level; `len - 1` stride-2 spatial downsamplings.
        temporal_down: per downsampling (len(channel_mults) - 1 entries): also stride 2 in time?
        num_res_blocks: ResBlocks per encoder level (the decoder has one more).
        heads: attention heads in the mid blocks.
        norm_groups: GroupNorm groups (gcd with the width is used).
        variational: predict mean and log-variance (KL-regularised) or the latent directly.
        temporal: False builds the image autoencoder (no temporal layers, no temporal compression).
    """

    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        base_channels: int = 128,
        channel_mults: Sequence[int] = (1, 2, 4, 4),
        temporal_down: Sequence[bool] | None = (True, True, True),
        num_res_blocks: int = 2,
        heads: int = 1,
        norm_groups: int = 32,
        variational: bool = True,
        temporal: bool = True,
    ) -> None:
        super().__init__()
        channel_mults = list(channel_mults)
        temporal_down = list(temporal_down) if temporal_down is not None else [False] * (len(channel_mults) - 1)
        if len(temporal_down) != len(channel_mults) - 1:
            raise ValueError(
                f"temporal_down has {len(temporal_down)} entries; it needs one per downsampling, "
                f"len(channel_mults) - 1 = {len(channel_mults) - 1}"
            )
        if not temporal and any(temporal_down):
            raise ValueError("temporal=False (image autoencoder) cannot downsample in time: set temporal_down to all false")
        self.in_channels, self.latent_channels, self.variational = in_channels, latent_channels, variational
        self.spatial_factor = 2 ** (len(channel_mults) - 1)
        self.temporal_factor = 2 ** sum(bool(d) for d in temporal_down)
        self.config = dict(
            in_channels=in_channels, latent_channels=latent_channels, base_channels=base_channels,
            channel_mults=channel_mults, temporal_down=temporal_down, num_res_blocks=num_res_blocks, heads=heads,
            norm_groups=norm_groups, variational=variational, temporal=temporal,
        )  # fmt: skip
        shared = dict(
            base_channels=base_channels, channel_mults=channel_mults, temporal_down=temporal_down,
            num_res_blocks=num_res_blocks, heads=heads, groups=norm_groups, temporal=temporal,
        )  # fmt: skip
        moments = 2 * latent_channels if variational else latent_channels
        self.encoder = Encoder(in_channels, moments, **shared)
        self.decoder = Decoder(latent_channels, in_channels, **shared)

    # -- shapes ----------------------------------------------------------------------------------------------------
    def num_latent_frames(self, num_frames: int) -> int:
        """T' = ceil(T / ft)."""
        if num_frames < 1:
            raise ValueError(f"a clip needs at least one frame, got T={num_frames}")
        return -(-num_frames // self.temporal_factor)

    def latent_shape(self, video_shape: Sequence[int]) -> tuple[int, ...]:
        """`[B, 3, T, H, W]` → `[B, C, ceil(T/ft), H/fs, W/fs]`."""
        b, _, t, h, w = video_shape
        return (b, self.latent_channels, self.num_latent_frames(t), h // self.spatial_factor, w // self.spatial_factor)

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"TAE expects a video [B, {self.in_channels}, T, H, W] (an image has T = 1), got {tuple(x.shape)}")
        fs = self.spatial_factor
        if x.shape[-2] % fs or x.shape[-1] % fs:
            raise ValueError(f"TAE: H and W must be multiples of the spatial factor {fs}, got {tuple(x.shape[-2:])}")

    # -- encode / decode -------------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """`[B, 3, T, H, W]` → q(z|x) over `[B, C, ceil(T/ft), H/fs, W/fs]` (the length rule above)."""
        self._check_video(x)
        t = x.shape[2]
        if t > 1:
            x = pad_time(x, 0, self.num_latent_frames(t) * self.temporal_factor - t)
        moments = self.encoder(x)
        if not self.variational:
            return DiagonalGaussian(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
        """`[B, C, T', h, w]` → `[B, 3, num_frames, h·fs, w·fs]`; num_frames defaults to ft·T' (1 when T' = 1)."""
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"TAE.decode expects a latent [B, {self.latent_channels}, T', h, w], got {tuple(z.shape)}")
        x = self.decoder(z)
        return self._fit_length(x, z.shape[2], num_frames)

    def _fit_length(self, x: torch.Tensor, latent_frames: int, num_frames: int | None) -> torch.Tensor:
        if num_frames is None:
            return x
        if self.num_latent_frames(num_frames) != latent_frames:
            raise ValueError(
                f"num_frames={num_frames} does not fit {latent_frames} latent frames: it must lie in "
                f"({self.temporal_factor * (latent_frames - 1)}, {self.temporal_factor * latent_frames}]"
            )
        if x.shape[2] == 1:
            return x.expand(-1, -1, num_frames, -1, -1)
        return x[:, :, :num_frames]

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        """Reconstruct x (same shape) from a sample of q(z|x) (or its mean); returns (x̂, q(z|x))."""
        posterior = self.encode(x)
        z = posterior.sample() if sample else posterior.mode()
        return self.decode(z, num_frames=x.shape[2]), posterior

    # -- tiled inference -------------------------------------------------------------------------------------------
    def encode_tiled(self, x: torch.Tensor, tile: int = 4) -> DiagonalGaussian:
        """Encode in non-overlapping temporal tiles of `tile·ft` frames (`tile` latent frames each).

        The clip is first extended to ft·T' frames (the length rule), so every tile boundary falls on a latent
        frame boundary and the latent has T' frames as in `encode`.
        """
        self._check_video(x)
        t = x.shape[2]
        span = tile * self.temporal_factor
        if t <= span:
            return self.encode(x)
        x = pad_time(x, 0, self.num_latent_frames(t) * self.temporal_factor - t)
        parts = [self.encode(x[:, :, s : s + span]) for s in range(0, x.shape[2], span)]
        mean = torch.cat([p.mean for p in parts], dim=2)
        logvar = torch.cat([p.logvar for p in parts], dim=2) if self.variational else None
        return DiagonalGaussian(mean, logvar)

    def decode_tiled(
        self,
        z: torch.Tensor,
        num_frames: int | None = None,
        tile: int = 4,
        overlap: int = 2,
        spatial_tile: int | None = None,
        spatial_overlap: int = 2,
    ) -> torch.Tensor:
        """Decode overlapping tiles and blend them: x = Σ_k w_k · Dec(z_k) / Σ_k w_k.

        Temporal tiles hold `tile` latent frames and start every `tile - overlap` frames (the last tile is
        aligned to the end). Each tile's weight rises linearly over its first `overlap·ft` output frames (unless
        it is the first) and falls over its last ones (unless it is the last): w = (i + 1) / (O + 1) on the
        ramps, so the two weights in an overlap of O frames sum to 1. `spatial_tile` (in latent pixels, with
        `spatial_overlap`) splits H and W the same way. Peak memory: the output plus one tile's activations.
        """
        if z.ndim != 5 or z.shape[1] != self.latent_channels:
            raise ValueError(f"TAE.decode_tiled expects a latent [B, {self.latent_channels}, T', h, w], got {tuple(z.shape)}")
        if not 0 <= overlap < tile:
            raise ValueError(f"decode_tiled: need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
        b, _, lt, lh, lw = z.shape
        ft, fs = self.temporal_factor, self.spatial_factor
        st = spatial_tile or max(lh, lw)
        if spatial_tile is not None and not 0 <= spatial_overlap < spatial_tile:
            raise ValueError(f"decode_tiled: need 0 <= spatial_overlap < spatial_tile, got {spatial_overlap}, {spatial_tile}")
        if lt <= tile and st >= max(lh, lw):
            return self.decode(z, num_frames)
        t_out = ft * lt if lt > 1 else 1
        out = z.new_zeros(b, self.in_channels, t_out, lh * fs, lw * fs)
        wsum = z.new_zeros(1, 1, t_out, lh * fs, lw * fs)
        for t0, t1 in tile_spans(lt, tile, overlap):
            wt = blend_ramp(ft * (t1 - t0) if lt > 1 else 1, overlap * ft, t0 == 0, t1 == lt)
            for h0, h1 in tile_spans(lh, st, spatial_overlap):
                wh = blend_ramp(fs * (h1 - h0), spatial_overlap * fs, h0 == 0, h1 == lh)
                for w0, w1 in tile_spans(lw, st, spatial_overlap):
                    ww = blend_ramp(fs * (w1 - w0), spatial_overlap * fs, w0 == 0, w1 == lw)
                    weight = (wt[:, None, None] * wh[None, :, None] * ww[None, None, :]).to(z)
                    y = self.decoder(z[:, :, t0:t1, h0:h1, w0:w1])
                    y = y.expand(-1, -1, wt.shape[0], -1, -1)  # a one-frame tile of a clip: its static clip
                    ts, hs, ws = (slice(ft * t0, ft * t0 + y.shape[2]), slice(fs * h0, fs * h1), slice(fs * w0, fs * w1))
                    out[:, :, ts, hs, ws] += weight * y
                    wsum[:, :, ts, hs, ws] += weight
                    del y
        return self._fit_length(out / wsum, lt, num_frames)


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) windows of `tile` covering 0..length, every `tile - overlap`, the last aligned to the end."""
    if length <= tile:
        return [(0, length)]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return [(s, s + tile) for s in dict.fromkeys(starts)]


def blend_ramp(length: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """Weights of one tile's `length` outputs: (i + 1)/(O + 1) over the first O (unless `first`),
    (length − i)/(O + 1) over the last O (unless `last`), 1 elsewhere; always > 0."""
    i = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if overlap > 0 and not first:
        w = torch.minimum(w, (i + 1) / (overlap + 1))
    if overlap > 0 and not last:
        w = torch.minimum(w, (length - i) / (overlap + 1))
    return w


# -- inflation ----------------------------------------------------------------------------------------------------------
def is_temporal_parameter(name: str) -> bool:
    """Parameters that the video model adds to the image model (temporal convs and temporal attention)."""
    return ".temporal." in f".{name}"


@torch.no_grad()
def inflate_image_weights(video: TAE, image_state: dict[str, torch.Tensor]) -> list[str]:
    """Copy an image autoencoder's weights into the video TAE; return the (temporal) names left at their init.

    Every non-temporal tensor of `video` must be in `image_state`, with the same shape or as a 2D kernel
    `[O, I, k, k]` that becomes `[O, I, 1, k, k]`. Temporal layers keep their initialisation (identity temporal
    convs, zero temporal attention output), so the inflated model reconstructs a static clip as the image model
    reconstructs its frame.
    """
    target = video.state_dict()
    missing, wrong = [], []
    for name, tensor in target.items():
        if is_temporal_parameter(name):
            continue
        if name not in image_state:
            missing.append(name)
            continue
        source = image_state[name]
        if source.ndim == 4 and tensor.ndim == 5:
            source = rearrange(source, "o i kh kw -> o i 1 kh kw")
        if source.shape != tensor.shape:
            wrong.append(f"{name}: image {tuple(image_state[name].shape)} vs video {tuple(tensor.shape)}")
            continue
        tensor.copy_(source)
    unexpected = sorted(set(image_state) - set(target))
    if missing or wrong or unexpected:
        raise ValueError(
            "inflate_image_weights: the image model does not match the video model's spatial layers:\n"
            f"  missing: {missing[:8]}\n  shape mismatch: {wrong[:8]}\n  not in the video model: {unexpected[:8]}"
        )
    return [name for name in target if is_temporal_parameter(name)]
