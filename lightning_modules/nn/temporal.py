"""Temporal layers that turn an image network into a video network, and `inflate`, which inserts them.

The Emu Video recipe used by Animated Stickers (arXiv 2402.06088): after every spatial convolution of the
ResBlocks a 1D convolution over frames, after every spatial attention a self-attention over frames, each at
every spatial position and each starting as the identity, so the inflated network computes exactly what the
image network did until training moves the temporal weights.

Tensors are frame-major activations [B, T, C, H, W] (the layout inside `nn.unet.UNet`); the number of frames T
is read from that shape, so one inflated network runs clips of any length (and images, T = 1).

    TemporalConv(x)      = x + Conv1d_t(x)                  kernel 3 over frames at every (h, w), zero padding;
                                                            weights and bias start at 0
    TemporalAttention(x) = x + W_o·Attn(LN(z) + PE(f))      z = x as (B·H·W, T, C) sequences of frames,
                                                            PE = sinusoid of the frame index f; W_o starts at 0

`inflate(net, freeze_spatial)` fills the temporal slots of a network's sites: every module with an attribute
`inflate_site` ("conv" or "attention"), an output width `channels` and an empty child slot `temporal` that its
forward applies to its output (`nn.unet.SpatialConv`, `nn.unet.SpatialTransformer`). Factories choose what goes
in each kind of site, so other lines reuse it on the same UNet (AVID's motion modules after every attention,
nothing after the convs: `inflate(unet, True, make_conv=None, make_attention=MotionModule)`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from einops import rearrange
from torch import nn

from kernels import Backend
from lightning_modules.nn.attention import Attention
from lightning_modules.nn.dit import sinusoidal_embedding

SITES = ("conv", "attention")


def frame_positions(frames: int, channels: int, device: torch.device | None = None) -> torch.Tensor:
    """Sinusoidal frame position embedding [T, C]: (cos(f·w_i), sin(f·w_i)) with w_i = 10000^(−i/(C/2)), zero-
    padded to C when C is odd."""
    pe = sinusoidal_embedding(torch.arange(frames, device=device), channels - channels % 2, scale=1.0)
    return nn.functional.pad(pe, (0, channels % 2))


class TemporalConv(nn.Module):
    """y = x + Conv1d_t(x): a 1D convolution over the frames of x [B, T, C, H, W] at every spatial position, with
    zero padding in time; its weights and bias start at zero, so it starts as the identity."""

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"TemporalConv: kernel_size={kernel_size} must be odd (centred in time)")
        self.channels = channels
        self.conv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.init_weights()

    def init_weights(self) -> None:
        """Zero weights and bias: the identity (the meta-init contract of `lightning_modules.parallel`)."""
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C, H, W] → [B, T, C, H, W]."""
        b, _, _, h, w = x.shape
        seq = rearrange(x, "b t c h w -> (b h w) c t")
        return x + rearrange(self.conv(seq), "(b h w) c t -> b t c h w", b=b, h=h, w=w)


class TemporalAttention(nn.Module):
    """y = x + W_o·SelfAttn(LN(z) + PE): self-attention among the T frames at each spatial position of
    x [B, T, C, H, W] (sequences (B·H·W, T, C)), sinusoidal frame position embedding, output projection W_o
    starting at zero, so it starts as the identity."""

    def __init__(self, channels: int, heads: int = 4, head_dim: int | None = None,
                 attention_backend: Backend = "auto") -> None:
        super().__init__()
        self.channels = channels
        self.norm = nn.LayerNorm(channels)
        self.attn = Attention(channels, heads, head_dim=head_dim, backend=attention_backend)
        self.init_weights()

    def init_weights(self) -> None:
        """LayerNorm 1 / 0, attention as `Attention.init_weights`, then the output projection 0."""
        self.norm.reset_parameters()
        self.attn.init_weights()
        nn.init.zeros_(self.attn.to_out.weight)
        if self.attn.to_out.bias is not None:
            nn.init.zeros_(self.attn.to_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, C, H, W] → [B, T, C, H, W]."""
        b, t, c, h, w = x.shape
        z = rearrange(x, "b t c h w -> (b h w) t c")
        q = self.norm(z) + frame_positions(t, c, x.device).to(z.dtype)
        return x + rearrange(self.attn(q), "(b h w) t c -> b t c h w", b=b, h=h, w=w)


def default_conv(site: nn.Module) -> nn.Module:
    """The layer after a spatial conv: `TemporalConv(site.channels)`."""
    return TemporalConv(site.channels)


def default_attention(site: nn.Module) -> nn.Module:
    """The layer after a spatial attention: `TemporalAttention` with the site's heads (4 if it has none)."""
    return TemporalAttention(site.channels, heads=getattr(site, "heads", 4))


def sites(net: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every temporal site of `net` (modules with `inflate_site` set, see the module docstring)."""
    for name, module in net.named_modules():
        if getattr(module, "inflate_site", None) in SITES:
            yield name, module


def temporal_layers(net: nn.Module) -> list[nn.Module]:
    """The layers in the filled temporal slots of `net`'s sites."""
    return [m.temporal for _, m in sites(net) if m.temporal is not None]


def temporal_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters of `net`'s temporal layers (what trains when the spatial weights are frozen)."""
    return [p for layer in temporal_layers(net) for p in layer.parameters()]


def inflate(net: nn.Module, freeze_spatial: bool = False, *,
            make_conv: Callable[[nn.Module], nn.Module] | None = default_conv,
            make_attention: Callable[[nn.Module], nn.Module] | None = default_attention) -> nn.Module:
    """Turn an image network into a video network, in place, and return it.

    Every site of kind "conv" gets `make_conv(site)` in its temporal slot, every site of kind "attention"
    `make_attention(site)` (a factory of None leaves that kind alone). The new layers are placed on the site's
    device and dtype (the meta device included). With `freeze_spatial`, every parameter of `net` but the temporal
    layers' stops requiring gradients (stage 1 of the stickers recipe, AVID's motion-module training); otherwise
    everything trains. A network whose slots are already filled is an error (inflating twice)."""
    factories = {"conv": make_conv, "attention": make_attention}
    found = list(sites(net))
    if not found:
        raise ValueError(f"inflate: {type(net).__name__} has no temporal sites (modules with `inflate_site`)")
    filled = [name for name, site in found if site.temporal is not None]
    if filled:
        raise ValueError(f"inflate: {type(net).__name__} is already inflated (temporal layers at {filled[:3]} ...)")
    for _, site in found:
        factory = factories[site.inflate_site]
        if factory is None:
            continue
        reference = next(site.parameters(), None)
        layer = factory(site)
        if reference is not None:
            layer = layer.to(device=reference.device, dtype=reference.dtype)
        site.temporal = layer
    if freeze_spatial:
        net.requires_grad_(False)
        for layer in temporal_layers(net):
            layer.requires_grad_(True)
    return net
