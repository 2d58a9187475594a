"""A text-to-image latent diffusion UNet of the Stable Diffusion / Emu family, as a backbone of the generation core.

It is a drop-in `net` for `lightning_modules.generation.GenerationModule`, called exactly like `nn.dit.DiT`:

    net(x, t, context, context_mask=None, fps=None, cond=None, frame_features=None) → [B, C_out, T, H, W]

x is a latent video [B, C, T, H, W] (an image is T = 1), t the time [B] of the objective's path, context the
text sequence [B, L, dim] (already projected to `dim` by `nn.text.TextConditioner`) with its mask bool [B, L]
(True = real token), cond the `cond_channels` concatenated condition latents [B, C_cond, T, H, W] (the sticker
image of InstructPix2Pix-style conditioning, AVID's mask and masked video).

The image model treats every frame on its own: frames are folded into the batch for every spatial layer, so
permuting the input frames permutes the output frames. Inside, activations are frame-major [B, T, C, H, W], so
folding frames into the batch ("b t c h w -> (b t) c h w") is a free view, and a temporal layer that
`nn.temporal.inflate` adds later reads the number of frames T from the shape it is given.

    h    = conv_in(concat(x, cond))                    3x3; the weights of the cond channels start at 0
    e    = MLP(sinusoid(t)) (+ MLP(sinusoid(fps))) (+ W_p·mean_masked(context)) (+ frame_features[:, f])
           (+ Σ_i MLP_i(sinusoid(s_i)))                the guidance scales s [B, n] of a guidance-distilled net
    down = per level: n × [ResBlock(h, e) → SpatialTransformer(h, context)?], then a stride-2 conv (not last)
    mid  = ResBlock → SpatialTransformer → ResBlock
    up   = per level: (n + 1) × [concat(h, skip) → ResBlock → SpatialTransformer?], then 2× nearest + conv
    out  = conv_out(SiLU(GroupNorm(h)))                 3x3, starts at 0

    ResBlock(h, e)         = skip(h) + conv2(Dropout(SiLU(GN(conv1(SiLU(GN(h))) + W_e·SiLU(e)))))
    SpatialTransformer(h)  = h + proj_out(blocks(proj_in(GN(h))))      tokens: the H·W positions of a frame
    TransformerBlock(z)    : z += SelfAttn(LN(z)) per frame;  z += CrossAttn(LN(z), context, mask);
                             z += W_2·(W_a z ⊙ GELU(W_g z))  (GEGLU feed-forward)

As in latent diffusion (ADM / LDM), the last conv of every ResBlock, the output projection of every transformer
and conv_out start at zero: every residual unit starts as its skip path and the network as the zero prediction.

Temporal sites. The layers after which `nn.temporal.inflate` inserts temporal layers carry an attribute
`inflate_site` ("conv" for the two 3x3 convs of each ResBlock, "attention" for each SpatialTransformer), their
output width `channels`, and an empty child slot `temporal` (None) that their forward applies to their output
when filled. The spatial weights keep their names when the model is inflated, so an image checkpoint loads into
the video model with only the temporal weights missing.

Attention goes through `nn.attention.Attention` (the kernels' single entry point).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from kernels import Backend
from lightning_modules.nn.attention import Attention, MiddleFrameAnchors
from lightning_modules.nn.dit import TimestepEmbedder, pooled
from lightning_modules.nn.temporal import default_attention, inflate


def fold(x: torch.Tensor) -> torch.Tensor:
    """Frames into the batch: [B, T, C, H, W] → [B·T, C, H, W] (a view of a contiguous frame-major tensor)."""
    return rearrange(x, "b t c h w -> (b t) c h w")


def unfold(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The inverse of `fold`: [B·T, C, H, W] → [B, T, C, H, W]."""
    return rearrange(x, "(b t) c h w -> b t c h w", b=batch)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm with statistics per frame of a frame-major [B, T, C, H, W] (never across frames)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unfold(super().forward(fold(x)), x.shape[0])


class SpatialConv(nn.Module):
    """A 2D convolution applied to every frame of a frame-major x [B, T, C, H, W] → [B, T, C_out, H', W'].

    With `site=True` it is a temporal site (see the module docstring): its `temporal` slot, when filled by
    `nn.temporal.inflate`, is applied to its output."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 site: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        self.channels = out_channels
        self.inflate_site = "conv" if site else None
        self.register_module("temporal", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = unfold(self.conv(fold(x)), x.shape[0])
        return y if self.temporal is None else self.temporal(y)


class ResBlock(nn.Module):
    """The LDM residual block with an additive time embedding (see the module docstring); conv2 starts at 0."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = FrameGroupNorm(groups, in_channels)
        self.conv1 = SpatialConv(in_channels, out_channels, site=True)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = FrameGroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = SpatialConv(out_channels, out_channels, site=True)
        self.skip = SpatialConv(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, T, C_in, H, W], emb [B, T or 1, emb_dim] → [B, T, C_out, H, W]."""
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + rearrange(self.emb(nn.functional.silu(emb)), "b t c -> b t c 1 1")
        h = self.conv2(self.dropout(nn.functional.silu(self.norm2(h))))
        return (x if self.skip is None else self.skip(x)) + h


class GEGLU(nn.Module):
    """The feed-forward of LDM transformers: W_2·(W_a z ⊙ GELU(W_g z)), hidden width `hidden`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(a * nn.functional.gelu(gate))


class TransformerBlock(nn.Module):
    """Per-frame self-attention, text cross-attention and a GEGLU feed-forward, each pre-LayerNorm and residual."""

    def __init__(self, channels: int, context_dim: int, heads: int, ffn_mult: int = 4,
                 attention_backend: Backend = "auto") -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(channels), Attention(channels, heads, backend=attention_backend)
        self.norm2 = nn.LayerNorm(channels)
        self.cross = Attention(channels, heads, context_dim=context_dim, backend=attention_backend)
        self.norm3, self.ffn = nn.LayerNorm(channels), GEGLU(channels, ffn_mult * channels)
        self.anchors: MiddleFrameAnchors | None = None  # AVID's middle-frame guidance, set by a windowed sampler

    def forward(self, z: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """z [B, T, N, C] (N = H·W positions of each frame), context [B, L, context_dim] → [B, T, N, C]."""
        b, t = z.shape[:2]
        per_frame = self.norm1(rearrange(z, "b t n c -> (b t) n c"))
        spatial = self.attn(per_frame) if self.anchors is None else self.anchors.self_attention(self.attn, per_frame, b)
        z = z + rearrange(spatial, "(b t) n c -> b t n c", b=b)
        # cross-attention treats every query on its own, so all frames of a sample share one call (no repeat
        # of the context per frame) and frames stay independent
        all_frames = rearrange(z, "b t n c -> b (t n) c")
        z = z + rearrange(self.cross(self.norm2(all_frames), context, key_padding_mask=context_mask),
                          "b (t n) c -> b t n c", t=t)
        return z + self.ffn(self.norm3(z))


class SpatialTransformer(nn.Module):
    """h + proj_out(TransformerBlocks(proj_in(GroupNorm(h)))) over the H·W positions of each frame; proj_out
    starts at 0. A temporal site ("attention"): its `temporal` slot is applied to its output when filled."""

    def __init__(self, channels: int, context_dim: int, heads: int, depth: int = 1, groups: int = 32,
                 ffn_mult: int = 4, attention_backend: Backend = "auto") -> None:
        super().__init__()
        self.channels, self.heads, self.inflate_site = channels, heads, "attention"
        self.norm = FrameGroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.blocks = nn.ModuleList(TransformerBlock(channels, context_dim, heads, ffn_mult, attention_backend)
                                    for _ in range(depth))
        self.proj_out = nn.Linear(channels, channels)
        self.register_module("temporal", None)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C, H, W], context [B, L, context_dim], context_mask bool [B, L] → [B, T, C, H, W]."""
        height = x.shape[-2]
        z = self.proj_in(rearrange(self.norm(x), "b t c h w -> b t (h w) c"))
        for block in self.blocks:
            z = block(z, context, context_mask)
        y = x + rearrange(self.proj_out(z), "b t (h w) c -> b t c h w", h=height)
        return y if self.temporal is None else self.temporal(y)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution of every frame: [B, T, C, H, W] → [B, T, C, H/2, W/2]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SpatialConv(channels, channels, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """2× nearest-neighbour upsampling of every frame, then a 3x3 convolution: [B, T, C, H, W] → [.., 2H, 2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = SpatialConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = nn.functional.interpolate(fold(x), scale_factor=2.0, mode="nearest")
        return self.conv(unfold(up, x.shape[0]))


class Level(nn.Module):
    """One resolution of the UNet: ResBlocks, each followed by a SpatialTransformer when the level attends, then
    an optional resampling layer (`Downsample` on the way down, `Upsample` on the way up)."""

    def __init__(self, res: Sequence[ResBlock], attn: Sequence[SpatialTransformer], resample: nn.Module | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)  # empty, or one per ResBlock
        self.resample = resample

    def layer(self, i: int, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
              context_mask: torch.Tensor | None) -> torch.Tensor:
        """ResBlock i (and its transformer) of this level."""
        h = self.res[i](h, emb)
        return self.attn[i](h, context, context_mask) if len(self.attn) else h


class UNet(nn.Module):
    """The text-to-image UNet backbone. See the module docstring.

    Args:
        in_channels: latent channels C.
        dim: width of the text context (the text conditioner's `dim`) and of the time embedding.
        channels: width of each level, from the finest resolution to the coarsest; H and W of the latent must
            be multiples of 2^(len(channels) − 1).
        layers_per_level: ResBlocks per level on the way down (one more on the way up, as in LDM).
        attention_levels: indices of the levels whose ResBlocks are followed by a SpatialTransformer (the
            middle block always has one).
        heads: attention heads of every transformer (each level's width must divide into them).
        transformer_depth: TransformerBlocks per SpatialTransformer.
        groups: GroupNorm groups (must divide every level's width).
        ffn_mult: GEGLU hidden width = ffn_mult · width.
        dropout: dropout inside the ResBlocks.
        cond_channels: extra input channels concatenated to x (zero-initialised input weights).
        out_channels: predicted channels (default in_channels).
        fps_embedding: add an embedding of the frame rate to the time embedding (last layer starts at 0).
        pooled_text: add a projection of the masked mean of the text to the time embedding (starts at 0).
        guidance_inputs: n, the guidance scales the network takes as an input (`forward(..., guidance=[B, n])`,
            a guidance-distilled student, Meng et al. 2023): e += Σ_i MLP_i(sinusoid(s_i)), each MLP's last
            layer starting at 0 (a student initialised from a teacher starts unchanged). 0: none.
        attention_backend: the kernels of every attention layer (`kernels.Backend`), as for the DiT.
    """

    input_weight = "conv_in.conv.weight"  # what `nn.dit.grow_input_channels` widens for new condition channels

    def __init__(self, in_channels: int = 4, dim: int = 64, channels: Sequence[int] = (32, 64),
                 layers_per_level: int = 1, attention_levels: Sequence[int] = (1,), heads: int = 4,
                 transformer_depth: int = 1, groups: int = 8, ffn_mult: int = 4, dropout: float = 0.0,
                 cond_channels: int = 0, out_channels: int | None = None, fps_embedding: bool = False,
                 pooled_text: bool = False, guidance_inputs: int = 0, attention_backend: Backend = "auto") -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        attention_levels = sorted(int(i) for i in attention_levels)
        if not channels or any(c % groups for c in channels):
            raise ValueError(f"UNet: every level width {channels} must be a multiple of groups={groups}")
        if any(i < 0 or i >= len(channels) for i in attention_levels):
            raise ValueError(f"UNet: attention_levels {attention_levels} must index the {len(channels)} levels")
        self.in_channels, self.cond_channels = in_channels, cond_channels
        self.out_channels = out_channels or in_channels
        self.dim, self.channels, self.heads = dim, channels, heads
        self.layers_per_level, self.attention_levels = layers_per_level, attention_levels

        def transformer(width: int) -> SpatialTransformer:
            return SpatialTransformer(width, dim, heads, transformer_depth, groups, ffn_mult, attention_backend)

        self.conv_in = SpatialConv(in_channels + cond_channels, channels[0])
        self.time = TimestepEmbedder(dim)
        self.fps = TimestepEmbedder(dim, scale=1.0) if fps_embedding else None
        self.text_pool = nn.Linear(dim, dim) if pooled_text else None
        if guidance_inputs < 0:
            raise ValueError(f"UNet: guidance_inputs={guidance_inputs} must be >= 0")
        self.guidance_inputs = int(guidance_inputs)
        self.guidance_embedders = nn.ModuleList(TimestepEmbedder(dim, scale=1.0) for _ in range(guidance_inputs))

        skips, width = [channels[0]], channels[0]
        down = []
        for i, c in enumerate(channels):
            res, attn = [], []
            for _ in range(layers_per_level):
                res.append(ResBlock(width, c, dim, groups, dropout))
                width = c
                if i in attention_levels:
                    attn.append(transformer(c))
                skips.append(width)
            last = i == len(channels) - 1
            down.append(Level(res, attn, None if last else Downsample(width)))
            if not last:
                skips.append(width)
        self.down = nn.ModuleList(down)
        self.skip_channels = tuple(skips)  # widths of the skip features, in order (structure guidance matches them)

        self.mid = Level([ResBlock(width, width, dim, groups, dropout), ResBlock(width, width, dim, groups, dropout)],
                         [transformer(width)], None)

        up = []
        for i in reversed(range(len(channels))):
            c = channels[i]
            res, attn = [], []
            for _ in range(layers_per_level + 1):
                res.append(ResBlock(width + skips.pop(), c, dim, groups, dropout))
                width = c
                if i in attention_levels:
                    attn.append(transformer(c))
            up.append(Level(res, attn, Upsample(width) if i > 0 else None))
        self.up = nn.ModuleList(up)

        self.norm_out = FrameGroupNorm(groups, width)
        self.conv_out = SpatialConv(width, self.out_channels)
        self.init_weights()

    @property
    def blocks(self) -> list[nn.Module]:
        """The repeated units (every ResBlock and SpatialTransformer) that activation checkpointing and FSDP2
        wrap one by one (`GenerationModule.shard_units`); computed, not registered, so names do not change."""
        return [m for m in self.modules() if isinstance(m, ResBlock | SpatialTransformer)]

    def init_weights(self) -> None:
        """The UNet's whole initialisation (the meta-init contract of `lightning_modules.parallel`).

        PyTorch's defaults for convolutions, linears and norms (`Attention.init_weights` for attention); zero for
        the last conv of every ResBlock, every transformer's proj_out, conv_out, the input weights of condition
        channels, the fps embedding's last layer, the guidance embeddings' last layers and the pooled-text
        projection. Temporal layers added by `nn.temporal.inflate` get their own `init_weights` (identity), last."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear | nn.GroupNorm | nn.LayerNorm):
                m.reset_parameters()
            elif isinstance(m, Attention):
                m.init_weights()
        zero = [self.conv_out.conv, *(m.conv2.conv for m in self.modules() if isinstance(m, ResBlock)),
                *(m.proj_out for m in self.modules() if isinstance(m, SpatialTransformer))]
        if self.fps is not None:
            zero.append(self.fps.mlp[-1])
        if self.text_pool is not None:
            zero.append(self.text_pool)
        zero.extend(embedder.mlp[-1] for embedder in self.guidance_embedders)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if self.cond_channels:
            with torch.no_grad():
                self.conv_in.conv.weight[:, self.in_channels:].zero_()
        for m in self.modules():
            temporal = getattr(m, "temporal", None) if getattr(m, "inflate_site", None) else None
            if temporal is not None and hasattr(temporal, "init_weights"):
                temporal.init_weights()

    def embedding(self, t: torch.Tensor, frames: int, context: torch.Tensor, context_mask: torch.Tensor | None,
                  fps: torch.Tensor | None, frame_features: torch.Tensor | None,
                  guidance: torch.Tensor | None = None) -> torch.Tensor:
        """The conditioning vector e [B, T or 1, dim] of every ResBlock (see the module docstring); guidance
        None adds no guidance embedding (as a guidance-input net at initialisation)."""
        emb = self.time(t)
        if guidance is not None:
            if guidance.shape != (t.shape[0], self.guidance_inputs) or not self.guidance_inputs:
                raise ValueError(f"UNet with guidance_inputs={self.guidance_inputs} got guidance "
                                 f"{tuple(guidance.shape)}; expected [{t.shape[0]}, {self.guidance_inputs}]")
            for i, embedder in enumerate(self.guidance_embedders):
                emb = emb + embedder(guidance[:, i].to(t))
        if self.fps is not None:
            emb = emb + self.fps(torch.zeros_like(t) if fps is None else fps.to(t))
        if self.text_pool is not None:
            emb = emb + self.text_pool(pooled(context.to(emb.dtype), context_mask))
        emb = rearrange(emb, "b d -> b 1 d")
        if frame_features is not None:
            if frame_features.shape[1] != frames:
                raise ValueError(f"UNet: frame_features has {frame_features.shape[1]} frames, the latent {frames}")
            emb = emb + frame_features.to(emb.dtype)
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None,
                fps: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                frame_features: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                structure: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None,
                structure_weight: float | torch.Tensor = 1.0) -> torch.Tensor:
        """x [B, C, T, H, W], t [B], context [B, L, dim], context_mask bool [B, L] → prediction [B, C_out, T, H, W].
        cond [B, cond_channels, T, H, W] is concatenated to x; frame_features [B, T, dim] are added to the time
        embedding of their frame; guidance [B, guidance_inputs] are the guidance scales (`guidance_inputs`).

        structure = (residuals, middle) of `nn.controlnet.StructureGuidance` (ControlNet-style, AVID's structure
        guidance): frame-major [B, T, C_i, H_i, W_i], one per skip feature (`skip_channels`), and one for the
        middle block's output; added as skip_i += w_s·r_i and mid += w_s·r_mid, w_s = structure_weight (a number
        or [B]). None: the plain UNet."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects a latent [B, {self.in_channels}, T, H, W], got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[-1] != self.dim:
            raise ValueError(f"UNet expects a text context [B, L, {self.dim}], got {tuple(context.shape)}")
        factor = 2 ** (len(self.channels) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"UNet with {len(self.channels)} levels needs latent H, W multiples of {factor}, "
                             f"got {x.shape[-2]}x{x.shape[-1]}")
        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels or cond.shape[2:] != x.shape[2:]:
                raise ValueError(f"UNet with cond_channels={self.cond_channels} needs cond [B, {self.cond_channels}, "
                                 f"{', '.join(map(str, x.shape[2:]))}], got {None if cond is None else tuple(cond.shape)}")
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        h = self.conv_in(rearrange(x, "b c t h w -> b t c h w").contiguous())
        emb = self.embedding(t, h.shape[1], context, context_mask, fps, frame_features, guidance).to(h.dtype)
        context = context.to(h.dtype)

        skips, h = encoder_pass(self.down, self.mid, h, emb, context, context_mask)
        if structure is not None:
            skips, h = self.add_structure(skips, h, structure, structure_weight)
        for level in self.up:
            for i in range(len(level.res)):
                h = level.layer(i, torch.cat([h, skips.pop()], dim=2), emb, context, context_mask)
            if level.resample is not None:
                h = level.resample(h)
        out = self.conv_out(nn.functional.silu(self.norm_out(h)))
        return rearrange(out, "b t c h w -> b c t h w")

    def add_structure(self, skips: list[torch.Tensor], mid: torch.Tensor,
                      structure: tuple[Sequence[torch.Tensor], torch.Tensor],
                      weight: float | torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """ControlNet's injection: skip_i + w_s·r_i and mid + w_s·r_mid (see `forward`)."""
        residuals, middle = structure
        if len(residuals) != len(skips) or any(r.shape != s.shape for r, s in zip(residuals, skips)):
            raise ValueError(f"UNet: structure residuals {[tuple(r.shape) for r in residuals]} must match the skip "
                             f"features {[tuple(s.shape) for s in skips]}")
        if middle.shape != mid.shape:
            raise ValueError(f"UNet: the middle structure residual {tuple(middle.shape)} must be {tuple(mid.shape)}")
        if isinstance(weight, torch.Tensor):  # one w_s per sample: a batch mixing AVID's tasks
            weight = (rearrange(weight, "b -> b 1 1 1 1") if weight.ndim == 1 else weight).to(mid.dtype)
        skips = [s + weight * r.to(s.dtype) for s, r in zip(skips, residuals)]
        return skips, mid + weight * middle.to(mid.dtype)


def encoder_pass(down: nn.ModuleList, mid: Level, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                 context_mask: torch.Tensor | None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The encoder half from conv_in's output h: (the skip features, conv_in's included; the middle's output).
    Shared by the UNet and its structure guidance's copy of the encoder (`nn.controlnet`)."""
    skips = [h]
    for level in down:
        for i in range(len(level.res)):
            h = level.layer(i, h, emb, context, context_mask)
            skips.append(h)
        if level.resample is not None:
            h = level.resample(h)
            skips.append(h)
    h = mid.res[0](h, emb)
    h = mid.attn[0](h, context, context_mask)
    return skips, mid.res[1](h, emb)


TEMPORAL_LAYOUTS = ("conv_and_attention", "motion_modules")


def video_unet(freeze_spatial: bool = False, temporal: str = "conv_and_attention", **kwargs: Any) -> UNet:
    """`UNet(**kwargs)` inflated with temporal layers (`nn.temporal.inflate`), in one call for configs
    (`_target_: lightning_modules.nn.unet.video_unet`). Its spatial weights keep the image UNet's names, so
    `init_from` an image checkpoint loads them.

    temporal: "conv_and_attention" (Emu Video, Animated Stickers): a temporal conv after each spatial conv and a
        temporal attention after each spatial attention; "motion_modules" (AnimateDiff, AVID): a temporal
        transformer after every spatial layer, convs and attentions alike. Every one starts as the identity."""
    return inflate_layout(UNet(**kwargs), temporal, freeze_spatial)


def inflate_layout(net: UNet, temporal: str, freeze_spatial: bool = False) -> UNet:
    """`net` inflated in place with the temporal layout `temporal` (see `video_unet`)."""
    if temporal not in TEMPORAL_LAYOUTS:
        raise ValueError(f"model.net.temporal={temporal!r}; choose one of {TEMPORAL_LAYOUTS}")
    if temporal == "motion_modules":
        return inflate(net, freeze_spatial, make_conv=default_attention, make_attention=default_attention)
    return inflate(net, freeze_spatial)
